"""`capctl attach POD`, and the screen `capctl top` opens on a pod: its recent transcript,
then its events live, with a line to type messages into (textual).

The transcript starts at the `turn_start` of the pod's last few turns (`history
{last_turns}`, one event), then `subscribe {after_seq}` from just before it: capd replays
from there and goes live with no gap and no duplicate, and `capctl.session.Subscription`
resyncs after a `lagged`. Events show as `capctl watch` prints them (`EventPrinter`): each
finished line goes into a RichLog, and the line a text delta is still writing shows under
it. Ctrl-C detaches and never cancels: the pod's turn goes on.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO, cast

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, Input, RichLog, Static

from capctl.errors import CapctlError
from capctl.render import EventPrinter, one_line, permission_request_line
from capctl.session import PodClient, Subscription
from protocol.client import ConnectionClosed
from protocol.errors import ProtocolError
from protocol.methods import History, Pause, Permission, Resume, Run

Connect = Callable[[], Awaitable[PodClient]]
"""How a screen reaches its pod."""
DEFAULT_TURNS = 3
"""How many of the pod's last turns the transcript starts with."""
LOG_LINES = 10_000
"""What the transcript keeps on screen; older lines scroll away for good."""
ALLOW_KINDS = ("allow_once", "allow_always")
REJECT_KINDS = ("reject_once", "reject_always")
"""The options `y` and `n` choose, in order of preference (ACP's option kinds)."""
STATE_EVENTS = frozenset({"status", "permission_request", "permission_resolved", "turn_end"})
"""The events that change what the header and the question line show."""


class LogLines:
    """The text stream `EventPrinter` writes to: finished lines go to the RichLog, the
    unfinished one (text still streaming) to a Static under it."""

    def __init__(self, log: RichLog, partial: Static) -> None:
        self._log = log
        self._partial = partial
        self._rest = ""

    def write(self, text: str) -> None:
        *done, self._rest = (self._rest + text).split("\n")
        for line in done:
            self._log.write(Text(line))
        self._partial.update(Text(self._rest))

    def flush(self) -> None:
        """Nothing to flush: a stream's method that `EventPrinter` calls."""

    def note(self, line: str) -> None:
        """A line of attach's own (an ack, an error), after the current line."""
        if self._rest:
            self.write("\n")
        self._log.write(Text(line, style="italic"))


@dataclass
class PodState:
    """What the header shows, kept from the events: status, turn, open questions."""

    status: str | None = None
    turn_id: str | None = None
    asked: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The open permission questions by request id, oldest first."""

    def see(self, event: dict[str, Any]) -> None:
        match event.get("event"):
            case "status":
                self.status, self.turn_id = event.get("status"), event.get("turn_id")
            case "permission_request":
                self.asked[str(event.get("request_id"))] = event
            case "permission_resolved":
                self.asked.pop(str(event.get("request_id")), None)
            case "turn_end":
                self.asked.clear()

    def oldest_question(self) -> dict[str, Any] | None:
        return next(iter(self.asked.values()), None)


def choose_option(asked: dict[str, Any], kinds: tuple[str, ...]) -> str | None:
    """The optionId of the first of `kinds` the question offers."""
    options = [o for o in asked.get("options") or [] if isinstance(o, dict)]
    for kind in kinds:
        for option in options:
            if option.get("kind") == kind and isinstance(option.get("optionId"), str):
                return option["optionId"]
    return None


class MessageInput(Input):
    """The input line. While a permission question is open and nothing is typed, `y` and
    `n` are left to the screen's bindings, which answer it."""

    answering = False

    def check_consume_key(self, key: str, character: str | None) -> bool:
        if self.answering and not self.value and key in ("y", "n"):
            return False
        return super().check_consume_key(key, character)


class AttachScreen(Screen[str | None]):
    """A pod's transcript, live, and an input line (see the module's docstring).

    Dismissed with None when the user detaches (Ctrl-C, or Esc with `escape_detaches`),
    or with what went wrong when the pod cannot be reached or closes the connection.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c", "detach", "detach", priority=True),
        Binding("f2", "toggle_pause", "pause/resume", priority=True),
        Binding("escape", "escape", "pause/resume", priority=True, show=False),
        Binding("y", "answer('y')", "allow", priority=True, show=False),
        Binding("n", "answer('n')", "deny", priority=True, show=False),
    ]
    DEFAULT_CSS = """
    AttachScreen #head { height: 1; background: $boost; text-style: bold; }
    AttachScreen RichLog { height: 1fr; }
    AttachScreen #partial { height: auto; max-height: 8; }
    AttachScreen #asked { height: auto; color: $warning; }
    """

    def __init__(
        self,
        pod: str,
        connect: Connect,
        *,
        turns: int = DEFAULT_TURNS,
        escape_detaches: bool = False,
    ) -> None:
        """`connect` reaches the pod (`capctl.session.connect_pod`: at its socket, or
        through the daemon's)."""
        super().__init__()
        self._connect = connect
        self.pod = pod
        self.turns = turns
        self.escape_detaches = escape_detaches
        self.state = PodState()
        self._client: PodClient | None = None
        self._lines: LogLines | None = None
        self._printer: EventPrinter | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="head", markup=False)
        yield RichLog(max_lines=LOG_LINES, wrap=True)
        yield Static(id="partial", markup=False)
        yield Static(id="asked", markup=False)
        yield MessageInput(
            placeholder=f"a message for {self.pod}; Enter runs it (queued while busy)"
        )
        yield Footer()

    def on_mount(self) -> None:
        self._lines = LogLines(self.query_one(RichLog), self.query_one("#partial", Static))
        # LogLines has the two methods of a text stream that EventPrinter uses.
        self._printer = EventPrinter(cast(TextIO, self._lines))
        self._show_state()
        self.query_one(MessageInput).focus()
        self.run_worker(self._follow(), group="follow")

    # -- the pod's events ---------------------------------------------------------------

    async def _follow(self) -> None:
        try:
            client = await self._connect()
        except CapctlError as exc:
            self._fail(exc.message)
            return
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self._fail(f"cannot reach pod {self.pod}: {exc or type(exc).__name__}")
            return
        async with client:
            self._client = client
            if client.pod:
                self.state.status = client.pod.status
                self._show_state()
            try:
                await self._stream(client)
            except (ProtocolError, ConnectionError, ConnectionClosed, TimeoutError) as exc:
                self._fail(f"lost pod {self.pod}: {exc or type(exc).__name__}")
                return
        self._fail(f"pod {self.pod} closed the connection (stopped?)")

    def _fail(self, why: str) -> None:
        """End the screen with `why`, also as a notification for the app underneath (top)."""
        if self.is_current:
            self.app.notify(why, severity="error")
            self.dismiss(why)

    async def _stream(self, client: PodClient) -> None:
        first = await client.request(History(last_turns=self.turns, limit=1))
        start = first["events"][0]["seq"] - 1 if first.get("events") else 0
        events = Subscription(client)
        live_from = (await events.start(start)).get("last_seq", 0)
        if start >= live_from:
            self._note(f"── no earlier turns of {self.pod}; live from here")
        async for event in events:
            self._show(event)
            if isinstance(live_from, int) and event.get("seq") == live_from:
                self._note("── live from here")

    def _show(self, event: dict[str, Any]) -> None:
        assert self._printer is not None
        self._printer.show(event)
        if event.get("event") in STATE_EVENTS:
            self.state.see(event)
            self._show_state()

    def _note(self, line: str) -> None:
        if self._lines is not None:
            self._lines.note(line)

    def _show_state(self) -> None:
        state = self.state
        parts = [self.pod, state.status or "?"]
        if state.turn_id:
            parts.append(f"turn {state.turn_id}")
        if state.asked:
            parts.append(f"⚠ {len(state.asked)} permission question(s)")
        keys = "F2 pause/resume" if self.escape_detaches else "Esc/F2 pause/resume"
        head = self.query_one("#head", Static)
        head.update(Text(f"{' · '.join(parts)}   ({keys}, Ctrl-C detach)"))
        asked = state.oldest_question()
        line = ""
        if asked is not None:
            line = f"{permission_request_line(asked)}\n  y allows, n denies (with the input empty)"
        self.query_one("#asked", Static).update(Text(line))
        self.query_one(MessageInput).answering = asked is not None

    # -- what the user does -------------------------------------------------------------

    def on_input_submitted(self, message: Input.Submitted) -> None:
        text = message.value
        if not text.strip():
            return
        if self.state.status == "paused":
            self._note(
                f"[{self.pod} is paused: resume it first ({self._pause_key()}); "
                "a run now would cancel the paused turn]"
            )
            return
        message.input.value = ""
        self.run_worker(self._run(text), group="requests")

    async def _run(self, text: str) -> None:
        ack = await self._request(Run(text=text, if_busy="queue"))
        if ack is not None and ack.get("queued"):
            self._note(f"[queued] {one_line(text)} — starts when the current turn ends")

    def action_detach(self) -> None:
        self.dismiss(None)

    def action_escape(self) -> None:
        if self.escape_detaches:
            self.dismiss(None)
        else:
            self.action_toggle_pause()

    def action_toggle_pause(self) -> None:
        match self.state.status:
            case "running":
                self.run_worker(self._request(Pause()), group="requests")
            case "paused":
                self.run_worker(self._request(Resume()), group="requests")
            case status:
                self._note(f"[{self.pod} is {status or 'not known yet'}: nothing to pause]")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`y` and `n` answer a question only while one is open and the input is empty;
        otherwise they are typed."""
        if action == "answer":
            return bool(self.state.asked) and not self.query_one(MessageInput).value
        return True

    def action_answer(self, choice: str) -> None:
        asked = self.state.oldest_question()
        if asked is None:
            return
        kinds = ALLOW_KINDS if choice == "y" else REJECT_KINDS
        option = choose_option(asked, kinds)
        if option is None:
            self._note(f"[the question offers no {' or '.join(kinds)} option]")
            return
        request = Permission(request_id=str(asked.get("request_id")), option_id=option)
        self.run_worker(self._request(request), group="requests")

    async def _request(self, request: Run | Pause | Resume | Permission) -> dict[str, Any] | None:
        """Send `request` on the pod connection; an error becomes a line, never a crash."""
        if self._client is None:
            self._note(f"[not connected to {self.pod} yet]")
            return None
        try:
            return await self._client.request(request)
        except ProtocolError as exc:
            self._note(f"[{request.method}: {exc.code}: {exc.message}]")
        except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
            self._note(f"[{request.method}: {exc or type(exc).__name__}]")
        return None

    def _pause_key(self) -> str:
        return "F2" if self.escape_detaches else "Esc or F2"


class AttachApp(App[str | None]):
    """`capctl attach`: the AttachScreen alone; its dismissal ends the app with its result
    (None for a detach, else what went wrong)."""

    ENABLE_COMMAND_PALETTE = False

    def __init__(self, pod: str, connect: Connect, turns: int = DEFAULT_TURNS) -> None:
        super().__init__()
        self.attached = AttachScreen(pod, connect, turns=turns)

    def on_mount(self) -> None:
        self.push_screen(self.attached, self.exit)
