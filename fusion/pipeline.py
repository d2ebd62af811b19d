"""Three stages over a sequence of items, overlapped: read the next, compute this, finish the last.

A pass over a model is bound by memory traffic on the CPU (reading checkpoints out of the page
cache, writing and hashing the results) and by its kernel; run one after the other they add
up, overlapped they cost about the largest of them. `run_stages` reads item i+1 on a reader
thread while the caller's thread computes item i and a writer thread finishes item i-1, in order:

    reader   read(0)  read(1)    read(2)    ...
    caller            compute(0) compute(1) compute(2) ...
    writer                       finish(0)  finish(1)  ...

Reads alternate between two slots (0, 1): the reader waits until the slot it is about to
fill has been computed, so two buffer sets are enough. At most two results wait for the writer.
The first error in any stage stops all three and is raised in the caller's thread. With
`threaded=False` the same calls run one after the other in the caller's thread. With
`finish=None` there is no writer thread: `compute` finishes each item itself (decouple writes
into its writer's buffers as it computes, and a thread that only passed results on cost a hand-off
per item).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence, TypeVar

__all__ = ["run_stages", "RESULTS_IN_FLIGHT"]

Item = TypeVar("Item")
_POLL = 0.05  # seconds between looks at the stop flag while a stage waits
_QUEUED_RESULTS = 2
# Results alive at once: the one being finished, the queued ones, and the one just computed. A
# `compute` that returns buffers of its own may reuse them after this many items.
RESULTS_IN_FLIGHT = _QUEUED_RESULTS + 2


def run_stages(items: Sequence[Item], read: Callable[[Item, int], object], compute: Callable[[Item, object], object],
               finish: Callable[[Item, object], None] | None, *, threaded: bool = True) -> None:
    """read(item, slot) -> inputs; compute(item, inputs) -> result; finish(item, result), in order."""
    if not threaded:
        for item in items:
            result = compute(item, read(item, 0))
            if finish is not None:
                finish(item, result)
        return
    _Stages(items, read, compute, finish).run()


class _Stages:
    def __init__(self, items, read, compute, finish):
        self.items, self.read, self.compute, self.finish = list(items), read, compute, finish
        self.inputs: queue.Queue = queue.Queue(maxsize=1)
        self.results: queue.Queue = queue.Queue(maxsize=_QUEUED_RESULTS)
        self.free = [threading.Semaphore(1), threading.Semaphore(1)]  # a slot may be filled
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    # -- waiting that gives up when another stage failed -----------------------------------------

    def _put(self, q: queue.Queue, value) -> bool:
        while not self.stop.is_set():
            try:
                q.put(value, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return True, q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return False, None

    def _acquire(self, slot: int) -> bool:
        while not self.stop.is_set():
            if self.free[slot].acquire(timeout=_POLL):
                return True
        return False

    def _fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.stop.set()

    # -- the three stages ----------------------------------------------------------------------------

    def _reader(self) -> None:
        try:
            for i, item in enumerate(self.items):
                if not self._acquire(i % 2) or not self._put(self.inputs, self.read(item, i % 2)):
                    return
        except BaseException as error:  # handed to the caller's thread, which raises it
            self._fail(error)

    def _writer(self) -> None:
        try:
            for item in self.items:
                ok, result = self._get(self.results)
                if not ok:
                    return
                self.finish(item, result)
        except BaseException as error:
            self._fail(error)

    def run(self) -> None:
        threads = [threading.Thread(target=self._reader, name="condu-reader", daemon=True)]
        if self.finish is not None:
            threads.append(threading.Thread(target=self._writer, name="condu-writer", daemon=True))
        for thread in threads:
            thread.start()
        try:
            for i, item in enumerate(self.items):
                ok, inputs = self._get(self.inputs)
                if not ok:
                    break
                result = self.compute(item, inputs)
                self.free[i % 2].release()  # the slot's arrays are no longer needed
                if self.finish is not None and not self._put(self.results, result):
                    break
        except BaseException as error:
            self._fail(error)
        finally:
            if self.errors:
                self.stop.set()
            for thread in threads:
                thread.join()
        if self.errors:
            raise self.errors[0]
