"""Decoding in a worker thread, its pieces handed to the caller as they come.

A stream that decodes in the caller's thread holds the model (its adapters switched for decoding)
for as long as the caller holds the stream, so anything else the caller does with the model
between pieces would run it in the wrong state, or wait for itself. ``relayed`` runs the decoding
in a worker that holds whatever it needs only while it decodes; closing the stream early stops it
at the next piece and waits for the worker, so no decoding is left running behind the caller (nor
at interpreter exit)."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Raised:
    """An exception the worker hands over, raised again in the caller."""

    def __init__(self, error: BaseException):
        self.error = error


def unwrapped(item):
    """An item the worker handed over, or, for a ``Raised``, its exception raised here."""
    if isinstance(item, Raised):
        raise item.error
    return item


def relayed(produce: Callable[[threading.Event], Iterator[T]]) -> Iterator[T]:
    """The items of ``produce(stop)``, run in a worker thread (started at the first item asked for)
    and handed over as they come; its exceptions are raised here. Closing early sets ``stop`` (which
    ``produce`` may also check) and waits for the worker."""
    handed: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            items = produce(stop)
            try:
                for item in items:
                    if stop.is_set():
                        return
                    handed.put(item)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as err:  # handed to the caller
            handed.put(Raised(err))
        finally:
            handed.put(end)

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="sac-stream", daemon=True)
    worker.start()
    try:
        while (item := handed.get()) is not end:
            yield unwrapped(item)
    finally:
        stop.set()
        worker.join()
