import os
import random

# Each of pytest-xdist's workers, and every process its tests start, computes on its share of the cores
# (`-n 2` on 2 cores: one each). Set before torch is imported: more threads than cores, which every
# training spawned beside another test's would otherwise take, spin and wait on one another.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from project import reproduce_once  # noqa: E402


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
