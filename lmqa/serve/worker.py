"""One thread answers every question, one at a time.

An engine holds one state (the document, then the question being answered)
and the model is shared by all contexts, so questions are queued rather than
interleaved; the same thread also keeps any CUDA graph or compiled kernel
with the thread that made it. The queue is bounded: a request beyond it is
refused at once (HTTP 429) instead of waiting behind minutes of answers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """As many questions as the queue holds are waiting or being answered."""


class Cancelled(Exception):
    """The answer's client went away, or the server is stopping."""


class Job:
    """One question's place in the queue: its cancel flag and, once it ran,
    how long it waited for the thread."""

    def __init__(self, closing: threading.Event):
        self._closing = closing
        self.cancel = threading.Event()
        self.submitted = time.perf_counter()
        self.queued_s = 0.0

    def check(self) -> None:
        """Called between tokens: stop this answer when it is no longer wanted."""
        if self.cancel.is_set() or self._closing.is_set():
            raise Cancelled


class AnswerQueue:
    def __init__(self, limit: int):
        self.limit = limit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmqa-answer")
        self._lock = threading.Lock()
        self._active = 0  # waiting or being answered
        self._closing = threading.Event()

    @property
    def active(self) -> int:
        return self._active

    def submit(self, fn: Callable[[Job], T]) -> tuple[Job, asyncio.Future[T]]:
        """Queue fn(job) for the answer thread; QueueFull when the queue is full.
        The place is given back when fn has finished, not when its caller
        stops waiting, so a cancelled answer still counts until it stops."""
        with self._lock:
            if self._active >= self.limit:
                raise QueueFull
            self._active += 1
        job = Job(self._closing)
        future = self._pool.submit(self._run, fn, job)
        future.add_done_callback(self._release)
        return job, asyncio.wrap_future(future)

    @staticmethod
    def _run(fn: Callable[[Job], T], job: Job) -> T:
        job.queued_s = time.perf_counter() - job.submitted
        job.check()
        return fn(job)

    def _release(self, _: Future) -> None:
        with self._lock:
            self._active -= 1

    def close(self) -> None:
        """Stop the answer being given at its next token, drop the waiting
        ones and wait for the thread to end."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
