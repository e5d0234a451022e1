"""Overlap of two stages over a sequence of items, one item apart: the next item made on
another thread while the caller uses this one (:func:`one_ahead`: the next days' scores
computed while these days' risk tiers are, a COPY's next chunk encoded while this one is
sent), or this item used on another thread while the caller makes the next
(:func:`one_behind`: the daily scores stored while the next days are assessed)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from typing import TypeVar, cast

T = TypeVar("T")


def one_ahead(items: Iterable[T], name: str = "ahead") -> Iterator[T]:
    """``items`` in order (none of them None: it marks the end), each made on a thread of its
    own (named ``name``) while the caller uses the one before, and no more than one ahead, to
    bound memory. The first is started at once, before the caller asks for it. An error making
    an item is raised when that item is asked for."""
    source = iter(items)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def handed_out(ahead: Future[T | None]) -> Iterator[T]:
        with worker:
            while (made := [ahead.result()])[0] is not None:
                ahead = worker.submit(next, source, None)
                # Popped, not named: while the caller uses it, this generator holds no
                # reference to it, so it is freed as soon as the caller lets it go.
                yield cast("T", made.pop())

    # The first future is handed over, not closed over: a closure would keep its item.
    return handed_out(worker.submit(next, source, None))


R = TypeVar("R")


class ItemsFailed(RuntimeError):
    """Raised inside :func:`one_behind`'s consumer when making the next item failed."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def one_behind(consume: Callable[[Iterator[T]], R], items: Iterable[T], name: str = "behind") -> R:
    """``consume(parts)`` run on a thread of its own (named ``name``) over ``items`` as this
    thread makes them: the caller makes the next item while ``consume`` uses this one, with at
    most one made item waiting, to bound memory. Returns what ``consume`` returns.

    An error making an item is raised inside ``consume``'s iterator (as :class:`ItemsFailed`,
    so it can undo what it did) and then here; an error in ``consume`` stops the making and is
    raised here."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=1)
    end = object()

    def handed() -> Iterator[T]:
        while (item := handoff.get()) is not end:
            if isinstance(item, _Failed):
                raise ItemsFailed("making the next item failed") from item.error
            yield cast("T", item)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as worker:
        consumed = worker.submit(consume, handed())

        def hand(item: object) -> None:
            while not consumed.done():  # a consumer that failed takes nothing more
                with suppress(queue.Full):
                    handoff.put(item, timeout=0.05)
                    return

        source = iter(items)
        try:
            for item in source:
                hand(item)
                if consumed.done():
                    break
        except BaseException as exc:
            hand(_Failed(exc))
            wait([consumed])
            raise
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        hand(end)
        return consumed.result()
