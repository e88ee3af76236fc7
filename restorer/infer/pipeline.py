"""Photo after photo through three stages, the CPU work of one photo overlapping the network of
the next: what ``restorer restore`` runs over its inputs.

* ``load(item)``: decode the file (and read what the projection needs). CPU: Pillow, libjpeg.
* ``process(loaded)``: the network and the projection, on this (the calling) thread, which owns
  torch: a process has one torch thread pool, and two threads using it at once would each start
  their own team of threads and spin-wait against each other.
* ``finish(processed)``: encode and write the output. CPU: numpy, zlib (on its own threads).

With ``overlap`` (:func:`run_photos`), a single background thread runs the ``load`` and
``finish`` jobs in the order they were queued: while photo *i* is in ``process``, that thread
finishes photo *i-1*, then loads photo *i+1*. So at most two photos are held at once (the one in
the network, and the previous one being written or the next one being read); the main thread
waits for photo *i-1* to be written before it hands over photo *i*. Pillow's decoder, libjpeg,
numpy and zlib release the GIL, so the background work runs beside the network.

Every stage runs the same functions on the same data in both modes, so the files written are
byte for byte the same with and without overlap (tests/test_pipeline.py); only the order of
messages between photos can differ. An exception in any stage of one photo is handed to
``failed(item, exc)`` on the calling thread, and the other photos go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")


def _run(fn: Callable, arg) -> tuple[bool, Any]:
    """``fn(arg)`` as (ok, result or exception): a failure is data until the caller reports it."""
    try:
        return True, fn(arg)
    except Exception as exc:  # handed to failed() on the calling thread
        return False, exc


def run_photos(
    items: Sequence[Item],
    load: Callable[[Item], Any],
    process: Callable[[Any], Any],
    finish: Callable[[Any], None],
    failed: Callable[[Item, BaseException], None],
    overlap: bool = True,
) -> None:
    """Run every item through load -> process -> finish (see the module docstring); with
    ``overlap``, load and finish run on one background thread beside ``process``."""
    if not overlap or len(items) < 2:
        for item in items:
            arg = item
            for stage in (load, process, finish):
                ok, arg = _run(stage, arg)
                if not ok:
                    failed(item, arg)
                    break
        return
    with ThreadPoolExecutor(1, thread_name_prefix="restore-io") as worker:
        _overlapped(items, load, process, finish, failed, worker)


def _overlapped(items, load, process, finish, failed, worker: ThreadPoolExecutor) -> None:
    loading: Future | None = worker.submit(_run, load, items[0])
    writing: tuple[Any, Future] | None = None
    for i, item in enumerate(items):
        assert loading is not None
        ok, loaded = loading.result()
        # queued behind the previous photo's finish: at most two photos are held at once
        loading = worker.submit(_run, load, items[i + 1]) if i + 1 < len(items) else None
        if not ok:
            failed(item, loaded)
            continue
        ok, processed = _run(process, loaded)
        del loaded  # the decoded input is not needed any more
        _collect(writing, failed)
        writing = None
        if not ok:
            failed(item, processed)
            continue
        writing = (item, worker.submit(_run, finish, processed))
        del processed
    _collect(writing, failed)


def _collect(writing: tuple[Any, Future] | None, failed) -> None:
    """Wait for a finish job; report its failure."""
    if writing is not None:
        item, fut = writing
        ok, exc = fut.result()
        if not ok:
            failed(item, exc)
