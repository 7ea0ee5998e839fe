"""`capctl top`: every pod in a live table, with keys to steer the pod on the cursor row.

The table follows `Feed` (one daemon connection). A key's request goes to the row's pod
socket as a one-shot request in a worker thread; what it answers, or why it failed, goes
to the status line. The table and its keys are a screen of their own: a pod's transcript
(`AttachScreen`) pushed over it has its own keys, Ctrl-C among them, and the table goes on
following the feed underneath.
"""

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Static

from capctl.errors import CapctlError
from capctl.oneshot import pod_call
from capctl.tui.feed import Feed, FeedClosed
from capctl.tui.rows import COLUMNS, cells, tree
from protocol.errors import ProtocolError

KEYS = "p pause  r resume  c cancel  y/n answer a question  a/Enter attach  q quit"
TICK_S = 1.0
"""How often the FOR column is brought up to date between events."""
DONE = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}


def pick_option(options: list[dict[str, Any]], allow: bool) -> str | None:
    """The option id that allows (or rejects) this once: by its kind, else by its id."""
    wanted = "allow_once" if allow else "reject_once"
    for key in ("kind", "optionId"):
        for option in options:
            if option.get(key) == wanted:
                return str(option.get("optionId"))
    return None


class TopScreen(Screen[None]):
    BINDINGS = [
        Binding("q", "quit_top", "quit"),
        Binding("ctrl+c", "quit_top", "quit"),
        Binding("p", "pod('pause')", "pause"),
        Binding("r", "pod('resume')", "resume"),
        Binding("c", "pod('cancel')", "cancel"),
        Binding("y", "answer(True)", "allow"),
        Binding("n", "answer(False)", "reject"),
        Binding("a", "attach", "attach"),
    ]

    def __init__(self, runtime: Path, feed: Feed, via_daemon: bool = False) -> None:
        super().__init__()
        self.runtime = runtime
        self.feed = feed
        self.via_daemon = via_daemon
        """Pods are reached through the daemon socket (`capctl --via-daemon`)."""
        self.note = ""
        """The last action's outcome, shown in the status line."""
        self._order: list[str] = []
        self._shown: dict[str, tuple[str, ...]] = {}
        self.table: DataTable[str] = DataTable(cursor_type="row", zebra_stripes=True)
        self.summary = Static(id="summary")

    def compose(self) -> ComposeResult:
        yield self.table
        yield self.summary
        yield Static(KEYS, id="keys")

    def on_mount(self) -> None:
        table = self.table
        for label, width in COLUMNS:
            table.add_column(label, width=width, key=label)
        table.focus()
        self.set_interval(TICK_S, self.refresh_rows)
        self.run_worker(self._follow(), exclusive=True, group="feed")

    async def _follow(self) -> None:
        try:
            await self.feed.connect()
            self.refresh_rows()
            await self.feed.follow(self.refresh_rows)
        except FeedClosed:
            self.say("capd closed the connection: it stopped (q quits)")
        except (OSError, ProtocolError) as exc:
            self.say(f"lost capd: {exc} (q quits)")

    # -- the table ----------------------------------------------------------------------

    def refresh_rows(self) -> None:
        table = self.table
        now = time.time()
        rows = [(pod["pod"], cells(pod, depth, now)) for pod, depth in tree(self.feed.pods)]
        order = [name for name, _ in rows]
        if order != self._order:
            current = self.current_pod()
            table.clear()
            for name, row in rows:
                table.add_row(*row, key=name)
            self._order, self._shown = order, dict(rows)
            if current in order:
                table.move_cursor(row=order.index(current))
        else:
            for name, row in rows:
                before = self._shown[name]
                for (label, _), old, new in zip(COLUMNS, before, row, strict=True):
                    if old != new:
                        table.update_cell(name, label, new)
                self._shown[name] = row
        self._summarize()

    def _summarize(self) -> None:
        pods = self.feed.pods.values()
        running = sum(pod.get("status") == "running" for pod in pods)
        asking = sum(bool(pod.get("permissions")) for pod in pods)
        parts = [f"{len(self.feed.pods)} pods, {running} running"]
        if asking:
            parts.append(f"{asking} asking (y/n)")
        if self.feed.resyncs:
            parts.append(f"lagged {self.feed.resyncs}x, resynced")
        if self.note:
            parts.append(self.note)
        self.summary.update(" | ".join(parts))

    def current_pod(self) -> str | None:
        table = self.table
        if not self._order or not table.is_valid_row_index(table.cursor_row):
            return None
        return self._order[table.cursor_row]

    def say(self, note: str) -> None:
        self.note = note
        self._summarize()

    # -- keys ---------------------------------------------------------------------------

    def action_quit_top(self) -> None:
        self.app.exit(0)

    def action_pod(self, method: str) -> None:
        name = self.current_pod()
        if name is not None:
            self.run_worker(self._pod(name, method), group="actions")

    def action_answer(self, allow: bool) -> None:
        name = self.current_pod()
        if name is not None:
            self.run_worker(self._answer(name, allow), group="actions")

    def action_attach(self) -> None:
        from capctl.tui.attach import AttachScreen

        name = self.current_pod()
        if name is None:
            return
        from capctl.session import connect_pod

        def back(trouble: str | None) -> None:
            self.say(f"{name}: {trouble}" if trouble else f"detached from {name}")

        connect = partial(connect_pod, self.runtime, name, self.via_daemon)
        screen = AttachScreen(name, connect, escape_detaches=True)
        self.app.push_screen(screen, back)

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_attach()

    async def _pod(self, name: str, method: str) -> None:
        if await self._call(name, {"method": method}) is not None:
            self.say(f"{name}: {DONE[method]}")

    async def _answer(self, name: str, allow: bool) -> None:
        status = await self._call(name, {"method": "status"})
        if status is None:
            return
        asked = status.get("permissions") or []
        if not asked:
            self.say(f"{name} has no open permission question")
            return
        oldest = asked[0]
        option = pick_option(oldest.get("options") or [], allow)
        if option is None:
            self.say(f"{name}: its question offers no {'allow' if allow else 'reject'} once")
            return
        answer = {"method": "permission", "request_id": oldest["request_id"], "option_id": option}
        if await self._call(name, answer) is not None:
            title = (oldest.get("tool_call") or {}).get("title", "")
            self.say(f"{name}: {'allowed' if allow else 'rejected'} {title}".rstrip())

    async def _call(self, name: str, frame: dict[str, Any]) -> dict[str, Any] | None:
        """One request to the pod; None after saying why it failed."""
        try:
            return await asyncio.to_thread(pod_call, self.runtime, name, frame, self.via_daemon)
        except CapctlError as exc:
            self.say(f"{frame['method']} {name}: {exc}")
        except OSError as exc:
            self.say(f"{frame['method']} {name}: {exc.strerror or exc}")
        return None


class TopApp(App[int]):
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    DataTable { height: 1fr; }
    #summary { height: 1; background: $boost; }
    #keys { height: 1; color: $text-muted; }
    """

    def __init__(self, runtime: Path, feed: Feed, via_daemon: bool = False) -> None:
        super().__init__()
        self.top = TopScreen(runtime, feed, via_daemon)

    def get_default_screen(self) -> Screen[None]:
        return self.top


def run_top(runtime: Path, socket: Path, via_daemon: bool = False) -> int:
    app = TopApp(runtime, Feed(socket), via_daemon)
    app.run()
    return app.return_code or 0
