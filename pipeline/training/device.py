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
from torch import nn

from pipeline.base.errors import PipelineError

# cuBLAS splits a matrix product's reductions by the workspace it is given; a fixed workspace makes
# its results repeatable (NVIDIA's documented settings, the first the default here). Read when cuBLAS
# first starts in a process.
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


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
    return training_device(name, ranks, torch.cuda.device_count() if name.startswith("cuda") else 0)


def training_device(name: str, ranks: Ranks, cuda_devices: int) -> torch.device:
    """The device `name` means for this process, checked before any work: a torchrun job trains on one
    GPU per process, so its processes must not outnumber the GPUs nor share one named `cuda:N`."""
    if name == "cuda":
        if ranks.local_rank >= cuda_devices:
            raise PipelineError(
                f"this is process LOCAL_RANK={ranks.local_rank} of a torchrun job, but this machine has "
                f"{cuda_devices} CUDA device(s), one per process: start at most {cuda_devices} per machine "
                "(torchrun --nproc_per_node)")
        return torch.device("cuda", ranks.local_rank)  # one GPU per process of a torchrun job
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if ranks.world_size > 1:
        raise PipelineError(
            f"train.device is {name!r}, one GPU for all {ranks.world_size} processes of the torchrun job: "
            "set train.device to cuda (or auto), and each process trains on a GPU of its own")
    if device.index is not None and device.index >= cuda_devices:
        raise PipelineError(f"train.device is {name!r}, but this machine has {cuda_devices} CUDA device(s)")
    return device


def use_float32_precision(tf32: bool) -> str:
    """float32 arithmetic in IEEE float32, unless `train.tf32` asks for TF32: cuDNN's convolutions would
    otherwise round their inputs to TF32's 10-bit mantissa on Ampere and later GPUs (torch's default
    for them), far from the seed's float32. Returns the precision set, for the run's record."""
    # The flags of torch's older API: they set the newer one's precisions too (cuDNN's and cuBLAS's),
    # where setting only some of the newer ones leaves the older flags disagreeing, and torch.export,
    # which logs the model, then refuses to read them ("a mix of the legacy and new APIs").
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "tf32" if tf32 else "ieee"


def place_model(model: nn.Module, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """The model on its training device, in `memory_format`, but for a GPU's one-channel convolutions.

    A weight with one input channel counts as channels_last too, so cuDNN would run the first
    convolution as NHWC with one channel, for which its deterministic mode may find no engine
    ("unable to find an engine"). There it keeps the default layout (its output is then NCHW, which
    the next convolution converts). Not on a CPU, where oneDNN's NHWC kernel for it is deterministic
    and a step is about 1.5 times faster with it.
    """
    model = model.to(device, memory_format=memory_format)
    if device.type == "cuda":
        keep_default_layout_of_single_channel_convolutions(model)
    return model


def keep_default_layout_of_single_channel_convolutions(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 1:
            module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)


def use_deterministic_kernels(deterministic: bool) -> None:
    """Same params and seed on the same device and software give the same history, bit for bit.

    CPU kernels already are deterministic; on a GPU, cuDNN and cuBLAS pick among algorithms whose
    sums run in different orders, and a few kernels add with atomics. Call before any CUDA work.
    """
    if deterministic:
        preset = os.environ.get("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_WORKSPACES[0])
        if preset not in DETERMINISTIC_CUBLAS_WORKSPACES:
            raise PipelineError(
                f"CUBLAS_WORKSPACE_CONFIG is {preset!r}, with which cuBLAS is not deterministic, as "
                f"train.deterministic asks: unset it (the stage sets {DETERMINISTIC_CUBLAS_WORKSPACES[0]}) or set one "
                f"of {', '.join(DETERMINISTIC_CUBLAS_WORKSPACES)}")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = preset
    # torch.use_deterministic_algorithms(mode) is this call plus the same flag in torch.compile's
    # config, whose import (torch._inductor, torch._dynamo) costs 1 to 2 s of every training's start;
    # nothing here compiles.
    torch._C._set_deterministic_algorithms(deterministic)
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
