"""Training batches: what each micro-batch holds, and drawing them ahead of
the training step in a background thread.

A micro-batch is a pure function of (seed, step, draw): the sampler's rng is
reseeded from those three numbers right before drawing it. So a resumed run
trains on exactly the batches the uninterrupted run would have, however far
the prefetcher had run ahead when it stopped, and a checkpoint keeps no
sampler state. A process's draw number is micro * num_processes +
process_index: N processes with grad_accum A draw between them what one
process with grad_accum N*A draws, the same global batch split differently.

Drawing ahead takes tokenization (most of a sampler's time) off the step's
critical path. A thread is enough: the main thread spends its time in torch
calls and in waiting for the device, which release the GIL, and so do the
tokenizers.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .data import landmark_batch


def draw_seed(seed: int, step: int, draw: int) -> int:
    """A 64-bit seed from the three numbers, the same in every process and
    Python version (hash() of a str is salted per process; sha256 is not)."""
    digest = hashlib.sha256(f"{seed},{step},{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_numbers(start: int, steps: int, grad_accum: int, process_index: int,
                 num_processes: int) -> Iterator[tuple[int, int]]:
    """(step, draw) of this process's micro-batches from step `start` on, in
    training order; see the module docstring for the draw numbers."""
    for step in range(start, steps):
        for micro in range(grad_accum):
            yield step, micro * num_processes + process_index


def draw_batch(sampler, seed: int, step: int, draw: int, batch_size: int, block_size: int,
               landmark_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `draw` of `step`: batch_size examples from `sampler` (anything
    with .sample() and the random.Random it draws from at .rng), with landmarks."""
    sampler.rng.seed(draw_seed(seed, step, draw))
    return landmark_batch([sampler.sample() for _ in range(batch_size)], block_size, landmark_id)


@dataclass
class _Failed:
    error: BaseException


_DONE = object()


class Prefetcher:
    """Iterates over make(key) for each key, computed up to `ahead` items
    ahead in a daemon thread. An exception in make() is raised by the
    next() that would have returned its item. Use it as a context manager:
    leaving stops the thread (a run that stops early, or fails, must not
    leave it blocked on a full queue)."""

    def __init__(self, make: Callable, keys: Iterable, ahead: int = 3):
        self._make = make
        self._keys = keys
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmqa-batches", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _DONE or isinstance(item, _Failed):
            self._queue.put(item)  # the thread has ended: a later next() ends alike rather than waiting forever
        if item is _DONE:
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def _run(self) -> None:
        try:
            for key in self._keys:
                if not self._put(self._make(key)):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        """Wait for room in the queue unless told to stop; False if stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
