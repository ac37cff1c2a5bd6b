"""`LayerProgress`: which layer groups of a prompt's KV are computed, so a hand-off can start on the
first layers while the last ones still compute. The engine thread marks each group as the forward
pass issues it (with the CUDA event after its kernels); the sender on an asyncio loop awaits the
groups in order and makes its own stream wait on each group's event."""

from __future__ import annotations

import asyncio
import time

import torch

from pdserve.kvtransfer.transport import KVTransferError


def layer_bounds(num_layers: int, layers_per_group: int) -> list[int]:
    """[0, g, 2g, ..., num_layers]: the group boundaries."""
    return [*range(0, num_layers, layers_per_group), num_layers]


class LayerProgress:
    """Made on the consumer's asyncio loop; marked from the engine thread."""

    def __init__(self, bounds: list[int]) -> None:
        if len(bounds) < 2 or bounds[0] != 0 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"layer bounds must rise from 0, got {bounds}")
        self.bounds = bounds
        self._aloop = asyncio.get_running_loop()
        self._groups: list[asyncio.Future[torch.cuda.Event | None]] = [self._aloop.create_future() for _ in bounds[1:]]

    @property
    def groups(self) -> list[tuple[int, int]]:
        """(layer_start, layer_end) of each group, in order."""
        return list(zip(self.bounds, self.bounds[1:]))

    def on_layer(self, layer: int, event: torch.cuda.Event | None) -> None:
        """Engine thread: layer `layer` is issued; `event` (None on the CPU) follows its work."""
        if layer + 1 in self.bounds:
            self._aloop.call_soon_threadsafe(_resolve, self._groups[self.bounds.index(layer + 1) - 1], event, None)

    def mark_all(self) -> None:
        """Every layer is already in the cache (nothing left to compute)."""
        for future in self._groups:
            self._aloop.call_soon_threadsafe(_resolve, future, None, None)

    def fail(self, error: BaseException) -> None:
        """Engine thread: the forward pass failed; groups not yet marked raise `error`."""
        for future in self._groups:
            self._aloop.call_soon_threadsafe(_resolve, future, None, error)

    async def ready(self, group: int, deadline: float) -> torch.cuda.Event | None:
        """Waits until group `group` is issued; the event its readers must wait on (None: none).
        KVTransferError (DEADLINE_EXCEEDED) once `deadline` (time.monotonic()) passes first."""
        future = self._groups[group]
        if future.done():  # the usual case once the pass is issued: no timer, no task
            return future.result()
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise KVTransferError(f"layers {self.groups[group]} were not computed in time", "DEADLINE_EXCEEDED") from None


def _resolve(future: asyncio.Future, event: torch.cuda.Event | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
        future.exception()  # marks it retrieved: a group nobody awaits any more is not an error to log
    else:
        future.set_result(event)


class LayerHook:
    """The forward pass's `on_layer` for the prompts a step completes: at each group boundary one
    CUDA event after the group's kernels (shared by those prompts), and a mark on each one's progress."""

    def __init__(self, progresses: list[LayerProgress], is_cuda: bool) -> None:
        self.progresses = progresses
        self.is_cuda = is_cuda
        self._bounds = set(progresses[0].bounds) if progresses else set()

    def __call__(self, layer: int) -> None:
        if layer + 1 not in self._bounds:
            return
        event = torch.cuda.Event() if self.is_cuda else None
        if event is not None:
            event.record()
        for progress in self.progresses:
            progress.on_layer(layer, event)

    def fail(self, error: BaseException) -> None:
        for progress in self.progresses:
            progress.fail(error)
