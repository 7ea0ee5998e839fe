"""Fan-out: a subscription's states (live, replaying, lagged, closed) driven through a
`FakeOutlet`, over an in-memory durable log."""

import pytest

from capd import fanout
from capd.fanout import CLOSED, LAGGED, LIVE, REPLAYING, Hub
from protocol.events import StatusChanged, TextDelta
from protocol.framing import encode
from tests.unit.outlet import FakeOutlet, flushed


class Log:
    """A durable log of status events, seq n at index n - 1, and its hub."""

    def __init__(self, events: int = 0) -> None:
        self.rows: list[tuple[int, bytes]] = []
        self.hub = Hub("p", lambda: len(self.rows), self.page)
        self.append(events)

    def page(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        return self.rows[after_seq : after_seq + limit]

    def append(self, count: int = 1) -> None:
        for _ in range(count):
            seq = len(self.rows) + 1
            frame = encode(StatusChanged(pod="p", seq=seq, status="idle"))
            self.rows.append((seq, frame[:-1]))
            self.hub.publish(frame, seq)

    def ephemeral(self) -> None:
        self.hub.publish(encode(TextDelta(pod="p", turn_id="t", text="...")))


FRAME_BYTES = len(encode(StatusChanged(pod="p", seq=1, status="idle")))


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "REPLAY_PAGE", 2)


async def test_a_live_subscription_gets_what_is_published_from_then_on() -> None:
    log, outlet = Log(3), FakeOutlet()
    sub = log.hub.subscribe(outlet, None)
    assert sub.state is LIVE
    log.append()
    log.ephemeral()
    log.append()
    assert (await flushed(outlet)).seqs() == [4, None, 5]
    assert sub.last_durable == 5


@pytest.mark.parametrize("after_seq", [3, 9])
async def test_after_seq_at_or_past_the_end_is_live_at_once(after_seq: int) -> None:
    log, outlet = Log(3), FakeOutlet()
    sub = log.hub.subscribe(outlet, after_seq)
    assert (sub.state, sub.last_durable) == (LIVE, 3)
    log.append()
    assert (await flushed(outlet)).seqs() == [4]


async def test_replay_then_live_with_no_gap_and_no_duplicate(small_pages: None) -> None:
    log, outlet = Log(5), FakeOutlet()
    sub = log.hub.subscribe(outlet, 1)
    assert sub.state is REPLAYING
    log.append()  # published while the replay waits: the replay reads it from the log
    log.ephemeral()  # not durable: lost to a replaying subscription
    drains = 0

    def publish_mid_replay() -> None:
        nonlocal drains
        drains += 1
        if drains <= 3:
            log.append()
            log.ephemeral()

    outlet.on_drain = publish_mid_replay
    await flushed(outlet)
    assert sub.state is LIVE
    log.append()
    await flushed(outlet)
    assert outlet.seqs() == list(range(2, 11))
    assert sub.last_durable == 10


async def test_an_event_committed_as_the_last_page_is_written_is_replayed_too() -> None:
    log, outlet = Log(3), FakeOutlet()
    sub = log.hub.subscribe(outlet, 0)

    def commit_one_more() -> None:  # the replay has written all it read
        outlet.on_drain = lambda: None
        log.append()

    outlet.on_drain = commit_one_more
    await flushed(outlet)
    log.append()
    assert sub.state is LIVE
    assert (await flushed(outlet)).seqs() == [1, 2, 3, 4, 5]


async def test_a_subscription_that_falls_behind_ends_lagged_with_where_to_resume() -> None:
    log, outlet = Log(), FakeOutlet(room=2 * FRAME_BYTES)
    sub = log.hub.subscribe(outlet, None)
    log.append(2)
    log.append()  # no room: the subscription lags
    assert (sub.state, sub.missed) == (LAGGED, 1)
    log.ephemeral()
    log.append()
    assert sub.missed == 3
    frames = (await flushed(outlet)).frames()
    assert [f.get("seq") for f in frames[:2]] == [1, 2]
    assert frames[2] == {"event": "lagged", "pod": "p", "missed": 3, "resume_from": 2}
    assert sub.state is CLOSED
    assert sub not in log.hub.subscriptions

    again = FakeOutlet()
    log.hub.subscribe(again, 2)  # resume_from
    assert (await flushed(again)).seqs() == [3, 4]


async def test_an_ended_subscription_gets_nothing_more() -> None:
    log, outlet = Log(), FakeOutlet()
    sub = log.hub.subscribe(outlet, None)
    sub.end()
    log.append()
    assert sub.state is CLOSED
    assert sub not in log.hub.subscriptions
    assert (await flushed(outlet)).written == b""


async def test_a_subscription_ended_before_its_replay_ran_replays_nothing() -> None:
    log, outlet = Log(3), FakeOutlet()
    sub = log.hub.subscribe(outlet, 0)
    sub.end()
    assert (await flushed(outlet)).written == b""
    assert sub.state is CLOSED


async def test_a_replay_stops_when_the_connection_closes(small_pages: None) -> None:
    log, outlet = Log(6), FakeOutlet()
    sub = log.hub.subscribe(outlet, 0)

    def hang_up() -> None:
        outlet.closing = True

    outlet.on_drain = hang_up
    assert (await flushed(outlet)).seqs() == [1, 2]
    assert sub.state is not LIVE


async def test_close_all_ends_every_subscription() -> None:
    log = Log(2)
    subs = [log.hub.subscribe(FakeOutlet(), after) for after in (None, 0)]
    log.hub.close_all()
    assert [sub.state for sub in subs] == [CLOSED, CLOSED]
    assert log.hub.subscriptions == set()


async def test_a_subscription_without_deltas_is_not_offered_them() -> None:
    log, every, whole = Log(1), FakeOutlet(), FakeOutlet()
    log.hub.subscribe(every, None)
    log.hub.subscribe(whole, None, deltas=False)
    log.hub.publish(encode(TextDelta(pod="p", turn_id="t", text="...")), None, delta=True)
    log.ephemeral()  # an ephemeral event that is no delta
    log.append()
    assert (await flushed(every)).seqs() == [None, None, 2]
    assert (await flushed(whole)).seqs() == [None, 2]
