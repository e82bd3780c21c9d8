"""CUDA graphs emulated on the CPU: what pipeline/training/graphs.py relies on, testable without a GPU.

`EmulatedCuda()`, as a context manager, stands in for torch.cuda.CUDAGraph, torch.cuda.graph, streams and
torch.cuda.device. A "capture" runs the step once while a TorchDispatchMode records its ATen ops
(the kernels a real capture would record: the forward, the autograd engine's backward, the
optimizer's update), then undoes what the step wrote and restores the random generator, since a
real capture runs nothing. A "replay" runs the recorded ops again on the very tensors of the
capture, with no Python of the step in between. So what a real graph gets wrong, the emulation gets
wrong too: a value read as a Python number during the capture is frozen into every replay, and a
read of a tensor's value on the host (`.item()`, `float(loss)`) is refused as a capture violation.

What it cannot tell: cuDNN's choice of engines, TF32, real streams and their ordering, the graph's
memory pool, NCCL (docs/gpu.md, "What the CPU tests cannot tell").
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Ops that make the host wait for the device: illegal in a CUDA graph capture.
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
              aten.equal.default, aten.masked_select.default}


class CaptureViolation(RuntimeError):
    """The step did what a real CUDA graph capture refuses."""


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place, by its schema (`Tensor(a!)`), lists of them included."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = kwargs.get(argument.name) if argument.kwarg_only or position >= len(args) else args[position]
        written += [tensor for tensor in tree_flatten(value)[0] if isinstance(tensor, torch.Tensor)]
    return written


def _returns_fresh(func) -> bool:
    """Whether the op returns new tensors, rather than views or its own inputs written in place."""
    return all(result.alias_info is None for result in func._schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "EmulatedGraph"):
        super().__init__()
        self.graph = graph
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before a write)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNCS:
            raise CaptureViolation(f"{func} reads a tensor's value on the host during a CUDA graph capture")
        self.before += [(tensor, tensor.clone()) for tensor in _written(func, args, kwargs)]
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """torch.cuda.CUDAGraph's part that graphs.py uses: filled by `graph(...)`, then replay()."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, recorded in self.ops:
                if not _returns_fresh(func):
                    # A view already aliases the recorded tensors, as a real graph's addresses do;
                    # an op that writes in place writes them again.
                    if _written(func, args, kwargs):
                        func(*args, **kwargs)
                    continue
                for old, new in zip(tree_flatten(recorded)[0], tree_flatten(func(*args, **kwargs))[0]):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class EmulatedCuda:
    """The torch.cuda functions graphs.py and optim.py call, while the context lasts."""

    def __init__(self):
        self.capturing = False
        self.graphs: list[EmulatedGraph] = []

    @contextlib.contextmanager
    def graph(self, graph: EmulatedGraph, **options) -> Iterator[None]:
        recorder = _Recorder(graph)
        rng = torch.get_rng_state()
        self.capturing = True
        self.graphs.append(graph)
        try:
            with recorder:
                yield
        finally:
            self.capturing = False
            # A real capture computes nothing: undo its writes, latest first, and its random draws.
            with torch.no_grad():
                for tensor, value in reversed(recorder.before):
                    tensor.copy_(value)
            torch.set_rng_state(rng)

    def __enter__(self) -> "EmulatedCuda":
        stand_ins = {
            "is_available": lambda: True,
            "is_current_stream_capturing": lambda: self.capturing,
            "CUDAGraph": EmulatedGraph,
            "graph": self.graph,
            "Stream": _Stream,
            "current_stream": _Stream,
            "stream": lambda stream: contextlib.nullcontext(),
            "device": lambda device: contextlib.nullcontext(),
        }
        self.originals = {name: getattr(torch.cuda, name) for name in stand_ins}
        for name, value in stand_ins.items():
            setattr(torch.cuda, name, value)
        return self

    def __exit__(self, *error) -> None:
        for name, value in self.originals.items():
            setattr(torch.cuda, name, value)
