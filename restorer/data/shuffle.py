"""The shuffle of each epoch, and which of an epoch's items a resumed slot may pass over.

The buffer's decisions depend only on how many items were pushed (one fixed-range draw per push
once it is full, taken from blocks of ``DRAW_BLOCK`` draws; a permutation when the epoch closes),
never on the items themselves. So the output position of every push of an epoch can be computed
without the items (:func:`consumed_pushes`, vectorised: 2.0 s for a million pushes on a loaded
2-core machine, 40 s pushing them through a buffer): a slot that resumes after handing out ``k``
items of an epoch knows, for each item it reads, whether it lies in that consumed prefix -- and
need not decode it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

DRAW_BLOCK = 4096  # the buffer draws its slot indices this many at a time


class EpochBuffer:
    """The shuffle of one epoch: a buffer of ``size`` items; once full, each new item swaps out a
    random one; on close, the rest in random order. The output order depends only on the number
    of items pushed and the Generator, never on the items or on when they are taken out."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.buf: list = []
        self.out: deque = deque()
        self.draws: list[int] = []
        self.next = 0

    def push(self, item) -> None:
        if len(self.buf) < self.size:
            self.buf.append(item)
            return
        if not self.size:
            self.out.append(item)
            return
        if self.next == len(self.draws):
            self.draws, self.next = self.rng.integers(self.size, size=DRAW_BLOCK).tolist(), 0
        j = self.draws[self.next]
        self.next += 1
        self.out.append(self.buf[j])
        self.buf[j] = item

    def close(self) -> None:
        self.out.extend(self.buf[j] for j in self.rng.permutation(len(self.buf)).tolist())
        self.buf = []


def output_order(pushes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The push indices in the order an :class:`EpochBuffer` of ``size`` (Generator ``rng``, seeded
    as the real one) hands them out over an epoch of ``pushes`` items, computed without the items:
    once full, push ``t`` evicts the last item written to slot ``draw[t - size]`` (a stable sort by
    slot puts each write right after the one it evicts); at the close, the slots' last items leave
    in a random permutation."""
    if not size:
        return np.arange(pushes, dtype=np.int64)
    m = max(0, pushes - size)
    blocks = [rng.integers(size, size=DRAW_BLOCK) for _ in range(-(-m // DRAW_BLOCK))]
    slots = np.concatenate([np.arange(min(size, pushes)), *blocks])[:pushes]
    slots = slots.astype(np.uint16 if size <= 1 << 16 else np.int64)  # small ints: a radix sort below
    by_slot = np.argsort(slots, kind="stable")  # writes grouped by slot, in time order within each
    same = slots[by_slot][1:] == slots[by_slot][:-1]
    evicted = np.empty(pushes, dtype=np.int64)
    evicted[by_slot[1:][same]] = by_slot[:-1][same]  # the write at time t evicts the previous one of its slot
    last = np.ones(pushes, dtype=bool)
    last[by_slot[:-1][same]] = False  # the writes no later write evicts: in the buffer at the close
    held = np.flatnonzero(last)
    held = held[np.argsort(slots[held], kind="stable")]  # slot order, as the buffer's list
    return np.concatenate([evicted[size:], held[rng.permutation(len(held))]])


def consumed_pushes(pushes: int, consumed: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [pushes]: which pushes of an epoch of ``pushes`` items leave a buffer of ``size``
    (Generator ``rng``, seeded as the real one) among the first ``consumed`` outputs."""
    mask = np.zeros(pushes, dtype=bool)
    mask[output_order(pushes, size, rng)[:consumed]] = True
    return mask


def shuffle_within_epochs(
    items: Iterable[tuple[int, object]], size: int, rng_for: Callable[[int], np.random.Generator]
) -> Iterator[tuple[int, object]]:
    """Shuffle (epoch, item) pairs within each epoch (epochs arrive in order, never mixed in the
    output). While an epoch drains its buffer, one of its items leaves per item read for the next
    epoch, so the next buffer is full when the last one is empty: reading never pauses."""
    pending: deque = deque()  # (epoch, EpochBuffer), oldest first; all but the newest are closed
    for epoch, item in items:
        if not pending or pending[-1][0] != epoch:
            if pending:
                pending[-1][1].close()
            pending.append((epoch, EpochBuffer(size, rng_for(epoch))))
        pending[-1][1].push(item)
        head_epoch, head = pending[0]
        if len(pending) == 1:
            while head.out:
                yield head_epoch, head.out.popleft()
            continue
        if head.out:
            yield head_epoch, head.out.popleft()
        if not head.out:
            pending.popleft()
    for epoch, buf in pending:
        buf.close()
        while buf.out:
            yield epoch, buf.out.popleft()
