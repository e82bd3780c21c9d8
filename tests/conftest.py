import random

import mlflow
import numpy as np
import pytest
import torch

from project import reproduce_once


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is, and are skipped with the reason elsewhere (as on CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device, and this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def temporary_tracking_store(tmp_path, monkeypatch):
    """Every test logs into its own SQLite store, never into the project's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A stage run in-process sets MLflow's global URI, which outranks the variable: forget it.
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id):
    """A project after `dvc repro` (tests/project.py, reproduce_once), shared by every test process:
    pytest-xdist's workers have temporary folders side by side, and build it once between them."""
    root = tmp_path_factory.getbasetemp()
    return reproduce_once(root.parent if worker_id != "master" else root)
