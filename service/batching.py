"""Micro-batching: concurrent requests for the same model and input shape share one inference.

A batch runs when it holds ``max_batch`` inputs or when its first input has waited ``max_wait_s``. There
is no background task: the first request of a batch arms a timer on the event loop, and whichever comes
first (the timer or the request that fills the batch) sends it to the executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Pending:
    inputs: list[np.ndarray] = field(default_factory=list)  # each (1, 3, H, W)
    futures: list[asyncio.Future[np.ndarray]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    run_batch: Callable[[np.ndarray], np.ndarray] | None = None  # (N, 3, H, W) -> (N, C, h, w)


class MicroBatcher:
    def __init__(self, executor: Executor, max_batch: int, max_wait_s: float) -> None:
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._pending: dict[tuple[int, ...], _Pending] = {}

    async def submit(self, run_batch: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) -> (1, C, h, w) by ``run_batch``, possibly computed together with other requests.

        The batcher keeps no reference to ``run_batch`` beyond the pending batch, so a batcher kept per
        model does not keep the model alive.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        key = image.shape
        pending = self._pending.setdefault(key, _Pending(run_batch=run_batch))
        pending.inputs.append(image)
        pending.futures.append(future)
        if len(pending.inputs) >= self._max_batch:
            self._flush(key)
        elif pending.timer is None:
            pending.timer = loop.call_later(self._max_wait_s, self._flush, key)
        return await future

    def _flush(self, key: tuple[int, ...]) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        batch = np.concatenate(pending.inputs) if len(pending.inputs) > 1 else pending.inputs[0]
        assert pending.run_batch is not None
        task = asyncio.get_running_loop().run_in_executor(self._executor, pending.run_batch, batch)
        futures = pending.futures

        def deliver(done: asyncio.Future[np.ndarray]) -> None:
            error = asyncio.CancelledError() if done.cancelled() else done.exception()
            for index, future in enumerate(futures):
                if future.done():  # the request was cancelled (client went away)
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[index : index + 1])

        task.add_done_callback(deliver)
