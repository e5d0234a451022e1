"""one_ahead and one_behind: two stages overlapped over items, one item apart."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import closing

import pytest

from tutor_scoring_dagster.ahead import ItemsFailed, next_of_both, one_ahead, one_behind


def test_items_come_in_order_made_on_another_thread_one_ahead_at_most() -> None:
    made: list[int] = []
    threads: set[str] = set()

    def items() -> Iterator[int]:
        for i in range(5):
            threads.add(threading.current_thread().name)
            made.append(i)
            yield i

    taken = []
    for item in one_ahead(items(), "maker"):
        assert len(made) <= item + 2  # this one, and at most the next
        taken.append(item)
    assert taken == [0, 1, 2, 3, 4]
    assert threads == {"maker_0"}


def test_the_first_item_is_started_before_it_is_asked_for() -> None:
    started = threading.Event()

    def items() -> Iterator[int]:
        started.set()
        yield 1

    ahead = one_ahead(items())
    assert started.wait(5)
    assert list(ahead) == [1]


def test_an_error_making_an_item_is_raised_when_that_item_is_asked_for() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise RuntimeError("item 2 broke")

    ahead = one_ahead(items())
    assert next(ahead) == 1
    with pytest.raises(RuntimeError, match="item 2 broke"):
        next(ahead)


def test_the_pending_items_error_can_be_read_without_taking_it() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise RuntimeError("item 2 broke")

    with closing(one_ahead(items())) as ahead:
        assert ahead.pending_error() is None  # item 1 was made
        assert next(ahead) == 1
        assert isinstance(ahead.pending_error(), RuntimeError)
        with pytest.raises(RuntimeError, match="item 2 broke"):  # still there to take
            next(ahead)
        assert ahead.pending_error() is None  # closed: nothing pending


def failing_at(n: int, message: str) -> Iterator[int]:
    yield from range(n)
    raise RuntimeError(message)


def test_next_of_both_when_both_fail_raises_the_first_error_and_notes_the_other() -> None:
    """Two stages made side by side for the same item (the daily scores and their risk
    tiers): neither error hides the other."""
    with (
        closing(one_ahead(failing_at(1, "scores broke"))) as scores,
        closing(one_ahead(failing_at(1, "tiers broke"))) as tiers,
    ):
        assert next_of_both(scores, tiers) == (0, 0)
        with pytest.raises(RuntimeError, match="scores broke") as raised:
            next_of_both(scores, tiers)
    assert raised.value.__notes__ == [
        "making the other item failed too: RuntimeError('tiers broke')"
    ]


@pytest.mark.parametrize("broken", ["first", "second"])
def test_next_of_both_when_one_fails_raises_its_own_error(broken: str) -> None:
    fine = one_ahead(iter(range(5)))
    failing = one_ahead(failing_at(0, f"{broken} broke"))
    pair = (failing, fine) if broken == "first" else (fine, failing)
    with closing(fine), closing(failing), pytest.raises(RuntimeError) as raised:
        next_of_both(*pair)
    assert str(raised.value) == f"{broken} broke"
    assert not getattr(raised.value, "__notes__", None)


class Item:
    """An object that can be watched for being freed."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_an_item_is_freed_as_soon_as_the_caller_lets_go_of_it() -> None:
    """Neither the helper nor its thread keep an item once the caller is done with it (the
    daily scores rely on it: each chunk of days is ~0.4 GB at 10M sessions)."""
    alive: list[weakref.ref[Item]] = []
    for item in one_ahead(Item(n) for n in range(4)):
        alive.append(weakref.ref(item))
        del item
        gc.collect()
        assert [ref() for ref in alive] == [None] * len(alive)
    assert len(alive) == 4


def test_one_behind_consumes_on_another_thread_while_the_caller_makes_the_next() -> None:
    consumer_threads: set[str] = set()
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(5):
            made.append(i)
            yield i

    def consume(parts: Iterator[int]) -> list[int]:
        taken = []
        for part in parts:
            consumer_threads.add(threading.current_thread().name)
            assert len(made) <= part + 3  # this one, one waiting, one being made
            taken.append(part)
        return taken

    assert one_behind(consume, items(), "store") == [0, 1, 2, 3, 4]
    assert consumer_threads == {"store_0"}


def test_one_behind_a_failure_making_items_reaches_the_consumer_then_the_caller() -> None:
    """The consumer sees the failure in its iterator (to roll back), the caller gets the
    original error."""
    seen: list[object] = []

    def items() -> Iterator[int]:
        yield 1
        raise ValueError("making broke")

    def consume(parts: Iterator[int]) -> None:
        try:
            for part in parts:
                seen.append(part)
        except ItemsFailed as exc:
            seen.append(type(exc.__cause__).__name__)
            raise

    with pytest.raises(ValueError, match="making broke"):
        one_behind(consume, items())
    assert seen == [1, "ValueError"]


def test_one_behind_a_failing_consumer_stops_the_making() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            made.append(i)
            yield i

    def consume(parts: Iterator[int]) -> None:
        next(parts)
        raise RuntimeError("storing broke")

    with pytest.raises(RuntimeError, match="storing broke"):
        one_behind(consume, items())
    assert len(made) < 10


def test_closing_one_ahead_early_waits_for_the_item_being_made_and_closes_the_items() -> None:
    """Whatever the items use (a DuckDB cursor refuses to close while busy) is free once
    ``close()`` returns, even if the caller stopped before the end."""
    events: list[str] = []

    def items() -> Iterator[int]:
        try:
            yield 1
            time.sleep(0.3)
            events.append("second made")
            yield 2
        finally:
            events.append("items closed")

    with closing(one_ahead(items())) as ahead:
        assert next(ahead) == 1
    assert events == ["second made", "items closed"]


def test_one_behind_refuses_what_is_not_iterable_without_hanging() -> None:
    with pytest.raises(TypeError):
        one_behind(list, 5)  # type: ignore[arg-type]


def test_one_behind_an_interrupt_while_making_rolls_the_consumer_back_too() -> None:
    seen: list[str] = []

    def items() -> Iterator[int]:
        yield 1
        raise KeyboardInterrupt

    def consume(parts: Iterator[int]) -> None:
        try:
            for _ in parts:
                seen.append("part")
        except ItemsFailed:
            seen.append("rolled back")
            raise

    with pytest.raises(KeyboardInterrupt):
        one_behind(consume, items())
    assert seen == ["part", "rolled back"]


def test_one_behind_keeps_no_item_once_the_consumer_is_done_with_it() -> None:
    alive: list[weakref.ref[Item]] = []
    dead_when_next_made: list[bool] = []

    def items() -> Iterator[Item]:
        for n in range(4):
            gc.collect()
            dead_when_next_made.append(all(ref() is None for ref in alive[:-1]))
            yield Item(n)

    def consume(parts: Iterator[Item]) -> int:
        count = 0
        for part in parts:
            alive.append(weakref.ref(part))
            count += 1
        return count

    assert one_behind(consume, items()) == 4
    assert all(dead_when_next_made)
