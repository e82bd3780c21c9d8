import os
import random

# Each of pytest-xdist's workers, and every process its tests start, computes on its share of the cores
# (`-n 2` on 2 cores: one each). Set before torch is imported: more threads than cores, which every
# training spawned beside another test's would otherwise take, spin and wait on one another.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import mlflow  # noqa: E402
from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry  # noqa: E402
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlAlchemyStore  # noqa: E402
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: E402
from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support.project import reproduce_once  # noqa: E402


def cuda_unusable() -> str | None:
    """Why CUDA cannot run a kernel here (None when it can), in a few words with the build's CUDA version."""
    build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none: a CPU-only build'}"
    try:
        if not torch.cuda.is_available():
            return f"{build}; torch.cuda.is_available() is False"
        (torch.ones(1, device="cuda") + 1).cpu()  # a kernel, run: the build supports this GPU
    except Exception as error:  # noqa: BLE001 - any failure is the reason
        return f"{build}; {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is, and are skipped with the reason elsewhere (as on CI). With
    REQUIRE_GPU=1 (the GPU machine's check) they cannot pass by skipping: the run stops, failed, in one line."""
    if not any("gpu" in item.keywords for item in items):
        return
    reason = cuda_unusable()
    if reason is None:
        return
    if os.environ.get("REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"REQUIRE_GPU=1, but CUDA is not usable ({reason})")
    skip = pytest.mark.skip(reason=f"needs a CUDA device ({reason})")
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
    # A passing test's folder is deleted (pytest.ini) and its name given to the next test of the same
    # name, while MLflow keeps every URI's store open in a cache: the next test would get the store of
    # a deleted file ("attempt to write a readonly database").
    TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()
    for store in (SqlAlchemyStore, RegistrySqlAlchemyStore):
        for engine in store._engine_map.values():
            engine.dispose()
        store._engine_map.clear()
    # A stage run in-process sets MLflow's global URI, which outranks the variable: forget it.
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id):
    """A project after `dvc repro` (tests/support/project.py, reproduce_once), shared by every test process:
    pytest-xdist's workers have temporary folders side by side, and build it once between them."""
    root = tmp_path_factory.getbasetemp()
    return reproduce_once(root.parent if worker_id != "master" else root)
