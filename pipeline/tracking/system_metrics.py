"""Whether a training's run logs MLflow's system metrics (GPU utilisation and memory among them)."""

from __future__ import annotations

import importlib.util

import torch

# The Python packages MLflow's system metrics need on a GPU machine, by the module they import.
SYSTEM_METRICS_PACKAGES = {"psutil": "psutil", "pynvml": "nvidia-ml-py"}


def logs_system_metrics(device: torch.device | None) -> bool:
    """On CUDA, where they show how busy the GPU is, and if the packages they need are there (else one
    line says which are missing)."""
    if device is None or device.type != "cuda":
        return False
    missing = [package for module, package in SYSTEM_METRICS_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        print(f"warning: no system metrics in MLflow: {' and '.join(missing)} not installed "
              "(pip install -r requirements.txt)", flush=True)
    return not missing
