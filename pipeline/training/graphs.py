"""A training step replayed from CUDA graphs: one launch for the ~100 kernels of a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    targets: torch.Tensor
    loss: torch.Tensor


class CapturedSteps:
    """Call it with the step: captured(step, images, targets, global_rows) -> the batch's loss, as
    step(images, targets, global_rows) would return it.

    A step of batch 128 launches about a hundred small kernels, and on a fast GPU the host's time
    to launch them is most of the step. So each batch shape is stepped eagerly a few times (cuDNN,
    cuBLAS and the allocator set themselves up), then captured once into a graph whose inputs are
    fixed buffers; later batches of that shape are copied into the buffers and the graph replayed.
    An epoch's last, smaller batch gets a graph of its own. The step's arithmetic is the same
    kernels either way; the optimizer must read its hyperparameters from the device
    (optim.NesterovSGD), and `before_replay` brings them up to date, since a replay runs no Python.

    The returned loss of a replay is the graph's own output buffer: read it before the next call.
    The step comes with each call rather than being kept: a step bound to its trainer, kept here,
    would make a cycle (trainer -> captured steps -> step -> trainer) that holds the graphs' device
    memory until the garbage collector runs, instead of freeing it with the trainer.

    Random numbers (dropout's masks) come from the device's default generator, which PyTorch
    registers with every graph captured on the current device: each replay draws the numbers after
    those of the step before, as an eager step would (the same Philox offsets, so the same masks),
    and advances the generator's state, which the checkpoint saves. So the capture runs on the
    training device, and its steps draw from no generator of their own.
    """

    WARMUP_STEPS = 3  # PyTorch's documented minimum before capturing a whole network's step

    def __init__(self, before_replay: Callable[[], None]):
        self.before_replay = before_replay
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.side_stream = torch.cuda.Stream()

    def __call__(self, step: Step, images: torch.Tensor, targets: torch.Tensor, global_rows: int) -> torch.Tensor:
        key = (tuple(images.shape), images.stride(), tuple(targets.shape), global_rows)
        captured = self.graphs.get(key)
        if captured is None:
            if self.eager_steps.get(key, 0) < self.WARMUP_STEPS:
                self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
                return self._on_side_stream(lambda: step(images, targets, global_rows))
            captured = self.graphs[key] = self._capture(step, images, targets, global_rows)
        captured.images.copy_(images)
        captured.targets.copy_(targets)
        self.before_replay()
        captured.graph.replay()
        return captured.loss

    def _on_side_stream(self, work: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Warm-up steps run off the default stream, as torch.cuda.graphs documents; the waits keep
        # them in order with the rest of the epoch without any host synchronisation.
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            result = work()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return result

    def _capture(self, step: Step, images: torch.Tensor, targets: torch.Tensor, global_rows: int) -> _Captured:
        """Record the step on fixed buffers; nothing runs until the graph is replayed. (The capture
        itself waits for the device once: a cost per batch shape, not per step.)"""
        static_images, static_targets = images.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        # Only this thread's calls are checked: the checkpoint's writer thread may be copying an
        # earlier epoch's state to the host meanwhile, on a stream of its own.
        with torch.cuda.device(images.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss = step(static_images, static_targets, global_rows)
        return _Captured(graph, static_images, static_targets, loss)
