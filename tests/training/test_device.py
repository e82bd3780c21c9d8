"""The kernels and devices a training process chooses: the CPU kernels (`train.portable_cpu`), and the GPU's
settings that can be checked without one; what needs CUDA is in test_gpu.py."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pipeline.base.errors import PipelineError
from pipeline.base.model import KeypointNet
from pipeline.train import training_settings
from pipeline.training.checkpoint import fingerprint
from pipeline.training.device import (PORTABLE_CPU_KERNELS, Ranks, keep_default_layout_of_single_channel_convolutions,
                                      place_model, training_device, use_deterministic_kernels, use_float32_precision,
                                      use_portable_cpu_kernels)
from tests.support.project import ROOT, default_config

PORTABLE = """
import os, torch
from pipeline.training.device import use_portable_cpu_kernels
{before}
print(use_portable_cpu_kernels(True))
print(torch.backends.cpu.get_cpu_capability())
"""


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_portable_kernels_are_avx2_in_a_process_that_sets_them_first():
    result = python(PORTABLE.format(before=""))
    assert result.returncode == 0, result.stderr
    settings, capability = result.stdout.splitlines()
    assert capability == "AVX2"
    assert eval(settings) == {"portable": "true", "capability": "AVX2", **PORTABLE_CPU_KERNELS}


def test_portable_kernels_are_refused_once_the_process_has_computed():
    """ATen picks its kernels at its first computation: later, the setting would silently not hold."""
    result = python(PORTABLE.format(before="torch.ones(2).sum()"))
    assert result.returncode != 0
    assert "PipelineError: train.portable_cpu is true, but torch's CPU kernels are" in result.stderr.splitlines()[-1]


def test_without_the_setting_nothing_is_changed():
    settings = use_portable_cpu_kernels(False)
    assert settings["portable"] == "false" and set(settings) == {"portable", "capability"}


# The GPU's settings, checked on the CPU where they are plain settings and pure functions.

def test_a_torchrun_job_with_more_processes_than_gpus_is_refused_before_any_work():
    assert training_device("cuda", Ranks(rank=1, local_rank=1, world_size=2), cuda_devices=2) == torch.device("cuda", 1)
    with pytest.raises(PipelineError, match=r"LOCAL_RANK=2 of a torchrun job, but this machine has 2 CUDA device\(s\)"
                                            r", one per process: start at most 2 per machine"):
        training_device("cuda", Ranks(rank=2, local_rank=2, world_size=3), cuda_devices=2)


def test_one_gpu_named_for_several_processes_is_refused():
    with pytest.raises(PipelineError, match="train.device is 'cuda:0', one GPU for all 2 processes"):
        training_device("cuda:0", Ranks(rank=0, local_rank=0, world_size=2), cuda_devices=2)
    with pytest.raises(PipelineError, match=r"'cuda:2', but this machine has 2 CUDA device\(s\)"):
        training_device("cuda:2", Ranks(), cuda_devices=2)
    assert training_device("cuda:1", Ranks(), cuda_devices=2) == torch.device("cuda", 1)
    assert training_device("cpu", Ranks(rank=1, local_rank=1, world_size=2), cuda_devices=0) == torch.device("cpu")


def test_a_cublas_workspace_that_is_not_deterministic_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(PipelineError, match="CUBLAS_WORKSPACE_CONFIG is ':0:0', with which cuBLAS is not deterministic"):
        use_deterministic_kernels(True)


@pytest.fixture
def determinism_restored(monkeypatch):
    """use_deterministic_kernels sets switches global to the process: the next test gets them back as they were."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)  # the value the call set; monkeypatch puts back one it removed
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark) = saved[2:]


@pytest.mark.parametrize("preset, expected", [("", ":4096:8"), (":16:8", ":16:8"), (":4096:2", ":4096:2")])
def test_the_cublas_workspace_is_set_or_kept_as_determinism_asks(preset, expected, monkeypatch, determinism_restored):
    deterministic = expected != ":4096:2"
    if preset:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    use_deterministic_kernels(deterministic)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == expected
    assert torch.are_deterministic_algorithms_enabled() is deterministic


def test_deterministic_kernels_load_no_compiler():
    """torch.use_deterministic_algorithms imports torch.compile's stack, 1 to 2 s of every training's
    start; the stage sets the same switch without it."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline.training.device import use_deterministic_kernels; "
                               "use_deterministic_kernels(True); print('torch._inductor' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded == "False\n"


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_is_ieee_on_a_gpu_unless_tf32_is_asked_for(tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert use_float32_precision(tf32) == ("tf32" if tf32 else "ieee")
        assert (torch.backends.cuda.matmul.fp32_precision == "tf32") is tf32
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is tf32
        # Both APIs agree, so that torch.export, which reads the older flags when the model is logged, can.
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_is_part_of_a_trainings_settings_and_of_its_checkpoints_fingerprint():
    config = default_config()
    assert config.train.tf32 is False  # the seed's float32 by default
    tf32 = dataclasses.replace(config, train=dataclasses.replace(config.train, tf32=True))
    settings = [training_settings(each, "net4", "data", torch.device("cuda"), Ranks()) for each in (config, tf32)]
    assert fingerprint(settings[0]) != fingerprint(settings[1])
    assert "cublas_workspace" in settings[0]


def test_a_single_channel_convolution_keeps_the_default_layout_and_computes_the_same():
    """Layout only: on a GPU, so that cuDNN's deterministic mode runs the first convolution as NCHW."""
    torch.manual_seed(0)
    model = KeypointNet().to(memory_format=torch.channels_last)
    first = model.features[0]
    assert first.weight.stride() == (9, 1, 3, 1)  # what channels_last makes of a one-channel weight
    images = torch.rand(2, 1, 96, 96)
    expected = model(images)
    keep_default_layout_of_single_channel_convolutions(model)
    assert first.weight.stride() == (9, 9, 3, 1) and first.weight is model.features[0].weight
    assert model.features[3].weight.is_contiguous(memory_format=torch.channels_last)  # the others keep theirs
    torch.testing.assert_close(model(images), expected)  # other kernels: equal to rounding


def test_on_a_cpu_the_model_keeps_the_faster_layout_throughout():
    model = place_model(KeypointNet(), torch.device("cpu"), torch.channels_last)
    assert model.features[0].weight.stride() == (9, 1, 3, 1)
