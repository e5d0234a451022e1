"""Overlap of two stages over a sequence of items, one item apart: the next item made on
another thread while the caller uses this one (:func:`one_ahead`: the next days' scores and
risk tiers computed while these days are assessed, a COPY's next chunk encoded while this one
is sent, the next landing file or batch read and validated while this one loads), or this
item used on another thread while the caller makes the next (:func:`one_behind`: the daily
scores stored while the next days are assessed).

Neither keeps an item once it has been handed on: at 10M sessions an item is a chunk of
~0.4 GB, and the point of working a chunk at a time is that few are alive at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)  # _Ahead only hands its items out
R = TypeVar("R")

_POLL_S = 0.05


def _close(items: Iterator[object]) -> None:
    """Close ``items`` if they can be (a generator's ``finally`` and ``with`` blocks run)."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class _Ahead(Generic[T_co]):
    """The iterator :func:`one_ahead` returns."""

    def __init__(self, items: Iterable[T_co], name: str) -> None:
        self._source = iter(items)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ahead: Future[T_co | None] | None = self._worker.submit(next, self._source, None)

    def __iter__(self) -> _Ahead[T_co]:
        return self

    def __next__(self) -> T_co:
        if self._ahead is None:
            raise StopIteration
        try:
            item = self._ahead.result()
        except BaseException:
            self.close()
            raise
        if item is None:
            self.close()
            raise StopIteration
        self._ahead = self._worker.submit(next, self._source, None)
        return item

    def pending_error(self) -> BaseException | None:
        """The error making the item not yet taken raised, once it is made (None if it was
        made, or none is pending); the item stays pending."""
        return None if self._ahead is None else self._ahead.exception()

    def close(self) -> None:
        """Wait for the item being made, then let the thread and the items go (also when the
        caller stops early: whatever the items use, a connection say, is free after this)."""
        self._ahead = None
        self._worker.shutdown(wait=True)
        _close(self._source)


def one_ahead(items: Iterable[T], name: str = "ahead") -> _Ahead[T]:
    """``items`` in order (none of them None: it marks the end), each made on a thread of its
    own (named ``name``) while the caller uses the one before, and no more than one ahead, to
    bound memory. The first is started at once, before the caller asks for it. An error making
    an item is raised when that item is asked for. Call ``close()`` (or use
    ``contextlib.closing``) when stopping before the end."""
    return _Ahead(items, name)


def next_of_both(first: Iterator[T], second: _Ahead[R]) -> tuple[T, R]:
    """The next item of each of two iterators made side by side (``second`` from
    :func:`one_ahead`). If making both failed, the first's error is raised with the second's
    noted on it, so that neither is lost; if one failed, its own error."""
    try:
        item = next(first)
    except Exception as exc:
        note_pending_error(exc, second, "the other item")
        raise
    return item, next(second)


def note_pending_error(exc: BaseException, pending: _Ahead[Any], what: str) -> None:
    """Note on ``exc`` that making ``pending``'s next item (``what``) failed too, if it did,
    so that neither error is lost: waits for the item without taking it."""
    other = pending.pending_error()
    if other is not None:
        exc.add_note(f"making {what} failed too: {other!r}")


class ItemsFailed(RuntimeError):
    """Raised inside :func:`one_behind`'s consumer when the items stopped coming: making the
    next one failed or the caller was interrupted."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def one_behind(consume: Callable[[Iterator[T]], R], items: Iterable[T], name: str = "behind") -> R:
    """``consume(parts)`` run on a thread of its own (named ``name``) over ``items`` as this
    thread makes them: the caller makes the next item while ``consume`` uses this one, with at
    most one made item waiting, to bound memory. Returns what ``consume`` returns.

    Whenever the items stop before their end (an error making one, an interrupt), ``consume``'s
    iterator raises :class:`ItemsFailed`, so that it can undo what it did, and the error is
    raised here; an error in ``consume`` stops the making and is raised here."""
    source = iter(items)
    handoff: queue.Queue[object] = queue.Queue(maxsize=1)
    stopped = threading.Event()
    end = object()

    def take() -> object:
        while True:
            try:
                return handoff.get(timeout=_POLL_S)
            except queue.Empty:
                if stopped.is_set():  # the caller left without handing the end over
                    raise ItemsFailed("the items stopped before their end") from None

    def handed() -> Iterator[T]:
        while (item := take()) is not end:
            if isinstance(item, _Failed):
                raise ItemsFailed("making the next item failed") from item.error
            yield cast("T", item)
            del item

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as worker:
        consumed = worker.submit(consume, handed())

        def hand(item: object) -> None:
            while not consumed.done():  # a consumer that failed takes nothing more
                with suppress(queue.Full):
                    handoff.put(item, timeout=_POLL_S)
                    return

        try:
            for item in source:
                hand(item)
                del item
                if consumed.done():
                    break
        except BaseException as exc:
            hand(_Failed(exc))
            wait([consumed])
            failed = consumed.exception()
            if failed is not None and not isinstance(failed, ItemsFailed):
                exc.add_note(f"{name}: the consumer had failed too: {failed!r}")
            raise
        else:
            hand(end)
        finally:
            stopped.set()
            _close(source)
    return consumed.result()
