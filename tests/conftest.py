import contextlib
import os
import random
import sqlite3
from pathlib import Path
from typing import Callable

# Each of pytest-xdist's workers, and every process its tests start, computes on its share of the cores
# (`-n 2` on 2 cores: one each). Set before torch is imported: more threads than cores, which every
# training spawned beside another test's would otherwise take, spin and wait on one another.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from tests.support.project import reproduce_once  # noqa: E402

# pytest-xdist's controller loads this file too, before it starts the workers, and runs no test: torch
# and MLflow (4 s) are imported by the hooks and fixtures that use them.


def cuda_unusable() -> str | None:
    """Why CUDA cannot run a kernel here (None when it can), in a few words with the build's CUDA version."""
    import torch

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
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def temporary_tracking_store(tmp_path, monkeypatch, copy_migrated_tables):
    """Every test logs into its own SQLite store, never into the project's."""
    import mlflow
    import mlflow.store.db.utils
    import mlflow.store.model_registry.sqlalchemy_store
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlAlchemyStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

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
    # MLflow's migrations take 5 to 8 s for each new SQLite store; a store this process creates gets
    # the tables of one store migrated once per run instead, when and where MLflow would create them.
    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", copy_migrated_tables)
    monkeypatch.setattr(mlflow.store.model_registry.sqlalchemy_store, "_initialize_tables", copy_migrated_tables)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return uri


def shared_temporary_folder(tmp_path_factory) -> Path:
    """The run's base temporary folder, which every test process shares: pytest-xdist's workers have
    theirs side by side in it."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def copy_migrated_tables(tmp_path_factory) -> Callable:
    """MLflow's _initialize_tables for a new SQLite store, from an empty store migrated once, by whichever
    test process first needs it, for them all: its tables copied into the file MLflow has just opened,
    by SQLite's own backup. The template has no Default experiment, which records the working directory
    as its artifact folder: the store creates it, as it does in a new store."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # MLflow's own: no test has replaced it yet

    folder = shared_temporary_folder(tmp_path_factory)
    template = folder / "migrated-mlflow.db"

    def migrated() -> Path:
        with FileLock(str(folder / "migrated-mlflow.lock")):
            if not template.exists():
                partial = template.with_suffix(".partial")
                partial.unlink(missing_ok=True)  # a migration that failed half-way
                engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
                partial.rename(template)
        return template

    def initialize(engine) -> None:
        if engine.dialect.name != "sqlite":
            _initialize_tables(engine)
            return
        with contextlib.closing(sqlite3.connect(migrated())) as source:
            target = engine.raw_connection()
            try:
                source.backup(target.driver_connection)
            finally:
                target.close()
    return initialize


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """A project after `dvc repro` (tests/support/project.py, reproduce_once), built once for every test process."""
    return reproduce_once(shared_temporary_folder(tmp_path_factory))
