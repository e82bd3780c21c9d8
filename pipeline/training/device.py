"""Where a training runs: the device, this process's place in a torchrun job, the kernels' determinism and
the portable CPU kernels (`train.portable_cpu`)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.utils.deterministic

from pipeline.base.errors import PipelineError

# cuBLAS splits a matrix product's reductions by the workspace it is given; a fixed workspace makes
# its results repeatable (NVIDIA's documented setting). Read when cuBLAS first starts in a process.
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; a plain `python -m` run is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> "Ranks":
        return cls(*(int(os.environ.get(name, default)) for name, default in
                     (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))))

    @property
    def lead(self) -> bool:
        """Only the lead rank logs to MLflow and writes files."""
        return self.rank == 0


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r}, but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", ranks.local_rank)  # one GPU per process of a torchrun job
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"train.device is {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def use_deterministic_kernels(deterministic: bool) -> None:
    """Same params and seed on the same device and software give the same history, bit for bit.

    CPU kernels already are deterministic; on a GPU, cuDNN and cuBLAS pick among algorithms whose
    sums run in different orders, and a few kernels add with atomics. Call before any CUDA work.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    # Deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised
    # memory; no kernel here reads any, and the fill would cost a pass over every activation.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    # Benchmarking picks the fastest convolution per shape by timing them: fast, but not repeatable.
    torch.backends.cudnn.benchmark = not deterministic


# One instruction set for ATen's, oneDNN's and MKL's CPU kernels, and MKL's sums split the same way
# whatever the thread count: the same bits on every x86-64 CPU with AVX2, for 1, 2 or 4 threads
# (docs/benchmarks.md, "The same bits on any CPU"). Each library reads its variable at its first
# computation, so they take effect if set before any tensor work of the process.
PORTABLE_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}


def use_portable_cpu_kernels(portable: bool) -> dict[str, str]:
    """The CPU kernels' settings in effect (`train.portable_cpu`), for the run and the checkpoint.

    Portable kernels cost about 30% of an epoch's time on a 2-core AVX-512 CPU (docs/benchmarks.md).
    Call before any tensor work: ATen, the one library that says which kernels it took, is checked.
    """
    if portable:
        os.environ.update(PORTABLE_CPU_KERNELS)
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX2":
            raise PipelineError(
                f"train.portable_cpu is true, but torch's CPU kernels are {capability}, not AVX2: "
                "this CPU lacks AVX2, or this process computed before the setting (run the stage in a process "
                "of its own)")
    return {"portable": str(portable).lower(), "capability": torch.backends.cpu.get_cpu_capability(),
            **({name: os.environ[name] for name in PORTABLE_CPU_KERNELS} if portable else {})}


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    if ranks.world_size == 1:
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
