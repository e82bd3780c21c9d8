"""The CPU kernels a training process chooses (`train.portable_cpu`); the CUDA side is in test_gpu.py."""

import subprocess
import sys

from pipeline.training.device import PORTABLE_CPU_KERNELS, use_portable_cpu_kernels
from project import ROOT

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
