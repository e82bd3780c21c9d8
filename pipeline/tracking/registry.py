"""MLflow's Model Registry: every trained net's model a version of the project's registered model
(registry.model_name), tagged with what it is and how it tested; the aliases that follow the
workspace (each net's name, and the champion); a version checked before its code runs.

The evaluate stage registers, since only it knows the test RMSE a version is tagged with and the
champion is chosen by: a version registered by the training would lack both until then. It registers
the model of the run that the training noted for the weights (trained_by.record_training_run), never a
run found by its tags, which anyone who
can write to the store could plant.

The aliases say what the workspace holds, and nothing else moves them: evaluate in the workspace
(`dvc repro`, `dvc exp run`) and `python -m pipeline.promote` (after `dvc exp apply` or `dvc
checkout`, which bring back weights without evaluating them). A queued or temporary experiment
(`dvc exp run --queue`, `--temp`) registers its versions, tagged with the experiment's name, and
moves no alias. docs/mlflow.md has the rules.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version

from pipeline.base.errors import PipelineError
from pipeline.tracking import pyfunc_model
from pipeline.tracking.export import MODEL_SIGNATURE
from pipeline.tracking.store import (TrackingError, connect, project_root, sqlite_file, store_calls, store_exists,
                                     store_failure, tracking_uri)
from pipeline.tracking.trained_by import WEIGHTS_TAG

CHAMPION = "champion"
MODELS_URI = "models:/"
# A version's tags: the net and its data, as its training run has them, its test figure, and the DVC
# experiment whose evaluation registered it (none for the workspace's own).
NET_TAG = "net"
DATA_TAG = "data_hash"
RMSE_TAG = "test_rmse_px"
SEED_TAG = "seed"
# Set by promote on each version of the workspace's trainings: the mean test RMSE of its net over the
# seeds of train.seeds, which the champion is chosen by, and how many seeds that mean is of.
NET_MEAN_TAG = "net_mean_test_rmse_px"
NET_SEEDS_TAG = "net_seeds"
EXPERIMENT_TAG = "dvc_experiment"
# The registered model's tag naming the project whose aliases it holds, as host:root.
OWNER_TAG = "project"
DESCRIPTION = ("The nets of the facial-keypoints pipeline: uint8 faces (n, 96, 96), gray levels 0..255, in; "
               "the 30 keypoints in pixels, under Kaggle's column names, out. One version per trained net's "
               "weights; aliases: each net's name, and champion on the net with the lowest test RMSE, as the "
               "project's workspace has them (docs/mlflow.md).")
# How a model of this pipeline is loaded (MLflow's "models from code"): MLflow's loader runs the model's
# own copy of pyfunc_model.py, given its two artifacts, with no other code on the import path.
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
ARTIFACTS = {pyfunc_model.NET_ARTIFACT: "artifacts/net.pt2", pyfunc_model.COLUMNS_ARTIFACT: "artifacts/columns.json"}


@dataclass(frozen=True)
class Trained:
    """A net's training: its MLflow run (trained_by.recorded_training_run) and its weights' checksum (models/<net>.json)."""

    net: str
    run_id: str
    weights: str


def project() -> str:
    """This project as OWNER_TAG names it: the machine and the root."""
    return f"{socket.gethostname()}:{project_root()}"


def shared_store() -> bool:
    """Whether other projects may use the tracking store: any but a SQLite file inside the project
    (the default, mlflow.db), which goes wherever the project is copied or moved."""
    database = sqlite_file(tracking_uri())
    return database is None or not database.resolve().is_relative_to(project_root())


def in_workspace() -> bool:
    """False in the copy of the project that a queued or temporary experiment runs in (DVC_ROOT names
    the original): its weights are not the workspace's, so it moves no alias."""
    root = os.environ.get("DVC_ROOT")
    return root is None or Path(root).resolve() == Path.cwd().resolve()


def register(model_name: str, trained: Trained, test_rmse_px: float) -> ModelVersion:
    """The version of the model that `trained`'s run logged, with its test RMSE; no alias moves.

    The same weights of the same run evaluated again are that version, so a rerun adds none; a
    version deleted by hand is registered again. Refused in one line: a run the store lacks or whose
    weights are not these, and a registered model of another project (claim).
    """
    run = trained_run(trained)
    client = mlflow.MlflowClient()
    with store_calls(f"{trained.net}'s model was not registered as {model_name}"):
        claim(client, model_name)
        version = _version_of(client, model_name, trained) or _new_version(client, model_name, run)
        tested = repr(float(test_rmse_px))  # all its digits, as evaluate.json has them
        if version.tags.get(RMSE_TAG) != tested:
            client.set_model_version_tag(model_name, version.version, RMSE_TAG, tested)
        experiment = os.environ.get("DVC_EXP_NAME")
        if experiment and not in_workspace() and EXPERIMENT_TAG not in version.tags:
            client.set_model_version_tag(model_name, version.version, EXPERIMENT_TAG, experiment)
        return client.get_model_version(model_name, version.version)


def promote(model_name: str, versions: dict[str, list[ModelVersion]]) -> ModelVersion:
    """The workspace's nets, tested on the same faces, each with a version per seed of train.seeds (the
    first seed's first): each net's alias on its first seed's version, the net's own files
    (models/<net>.pt), and the champion alias on the net with the lowest mean test RMSE over its seeds
    (the first net on a tie), on its version of the lowest test RMSE. Every version is tagged with its
    net's mean and number of seeds, so the champion's tags say why. An alias of a net the workspace no
    longer has is removed, so that every alias names a model of the workspace."""
    means = {net: sum(float(version.tags[RMSE_TAG]) for version in trainings) / len(trainings)
             for net, trainings in versions.items()}
    best_net = min(means, key=means.get)
    champion = min(versions[best_net], key=lambda version: float(version.tags[RMSE_TAG]))
    client = mlflow.MlflowClient()
    with store_calls(f"the aliases of {model_name} were not moved"):
        claim(client, model_name)
        for net, trainings in versions.items():
            for version in trainings:
                for key, value in ((NET_MEAN_TAG, repr(means[net])), (NET_SEEDS_TAG, str(len(trainings)))):
                    if version.tags.get(key) != value:
                        client.set_model_version_tag(model_name, version.version, key, value)
            client.set_registered_model_alias(model_name, net, trainings[0].version)
        client.set_registered_model_alias(model_name, CHAMPION, champion.version)
        for alias, number in client.get_registered_model(model_name).aliases.items():
            if alias not in versions and alias != CHAMPION and _net_of(client, model_name, number) == alias:
                client.delete_registered_model_alias(model_name, alias)
    return champion


def claim(client: mlflow.MlflowClient, model_name: str) -> None:
    """The registered model, created for this project if new (an older one without an owner is taken
    over); refused in one line if another project sharing the store owns it. A project's own SQLite
    store, copied or moved with it, is the copy's."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(model_name, tags={OWNER_TAG: project()}, description=DESCRIPTION)
            return
        except MlflowException as race:
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            model = client.get_registered_model(model_name)
    owner = model.tags.get(OWNER_TAG)
    if owner is None:
        client.set_registered_model_tag(model_name, OWNER_TAG, project())
    elif owner != project() and shared_store():
        raise TrackingError(f"the registered model {model_name} of {tracking_uri()} belongs to the project at {owner}: "
                            f"give this project a name of its own in params.yaml (registry.model_name), or, if "
                            f"that project moved here, delete the model's tag {OWNER_TAG}")


def trained_run(trained: Trained) -> mlflow.entities.Run:
    """The run that trained the net (as the training noted it), refused in one line if the store lacks it, deleted it, or has it
    tagged with another net or other weights."""
    client = mlflow.MlflowClient()
    with store_calls(f"run {trained.run_id}, which trained {trained.net}, was not read"):
        try:
            run = client.get_run(trained.run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(f"{tracking_uri()} has no run {trained.run_id}, which trained {trained.net} "
                                "(trained against another store?)") from None
    if run.info.lifecycle_stage != "active":
        raise TrackingError(f"run {trained.run_id}, which trained {trained.net}, is deleted")
    tags = run.data.tags
    if (tags.get(NET_TAG), tags.get(WEIGHTS_TAG)) != (trained.net, trained.weights):
        raise TrackingError(f"run {trained.run_id} did not train these weights of {trained.net} (it is tagged net "
                            f"{tags.get(NET_TAG)}, weights {tags.get(WEIGHTS_TAG)})")
    return run


def _version_of(client: mlflow.MlflowClient, model_name: str, trained: Trained) -> ModelVersion | None:
    """The version of the run's model, if registered: the first, should two evaluations have raced."""
    versions = client.search_model_versions(f"name = '{model_name}' AND run_id = '{trained.run_id}'",
                                            order_by=["version_number ASC"])
    found = [version for version in versions if version.tags.get(WEIGHTS_TAG) == trained.weights]
    return found[0] if found else None


def _new_version(client: mlflow.MlflowClient, model_name: str, run: mlflow.entities.Run) -> ModelVersion:
    """A new version of the run's logged model, tagged as the run is (net, weights, data)."""
    run_id = run.info.run_id
    logged = [model for model in client.search_logged_models([run.info.experiment_id],
                                                            filter_string=f"source_run_id = '{run_id}'")
              if model.status == LoggedModelStatus.READY]
    if not logged:
        raise TrackingError(f"run {run_id} has no model to register as {model_name}")
    tags = {key: run.data.tags[key] for key in (NET_TAG, WEIGHTS_TAG, DATA_TAG)}
    if SEED_TAG in run.data.params:  # a run of a training before seeds were listed has none
        tags[SEED_TAG] = run.data.params[SEED_TAG]
    return client.create_model_version(model_name, logged[0].model_uri, run_id=run_id, tags=tags,
                                       model_id=logged[0].model_id)


def _net_of(client: mlflow.MlflowClient, model_name: str, number: str) -> str | None:
    try:
        return client.get_model_version(model_name, number).tags.get(NET_TAG)
    except MlflowException:
        return None  # a version deleted by hand: its alias went with it


def is_model_uri(name: str) -> bool:
    """A models:/ URI rather than a net's name: no net of params.yaml can be named so (":" and "/")."""
    return name.startswith(MODELS_URI)


@dataclass(frozen=True)
class Loaded:
    """A model of the registry, checked and loaded, and the version it is (None for a models:/<model id>)."""

    model: mlflow.pyfunc.PyFuncModel
    version: ModelVersion | None

    def described(self) -> str:
        """What it is in a few words: "version 3 of facial-keypoints: net5, data ..., MLflow run ..."."""
        run = f"MLflow run {self.model.metadata.run_id}"
        if self.version is None:
            return run
        tags = self.version.tags
        tested = f", test RMSE {float(tags[RMSE_TAG]):.2f} px" if RMSE_TAG in tags else ""
        seed = f" seed {tags[SEED_TAG]}" if SEED_TAG in tags else ""
        return (f"version {self.version.version} of {self.version.name}: {tags.get(NET_TAG)}{seed}, "
                f"data {tags.get(DATA_TAG)}{tested}, {run}")


def load(uri: str) -> Loaded:
    """The model a models:/ URI names, on the CPU, once its files are checked (check_model).

    Refused in one line: a store that is not there (not created here), a URI that names nothing in
    it or a stage (this pipeline's versions have none), and a model that is not one of this
    pipeline's: its code is not run.
    """
    try:
        parsed = _parse_model_uri(uri)  # MLflow's own parser: asks no store
    except MlflowException:
        raise PipelineError(f"{uri}: not a models:/ URI of MLflow: models:/<name>@<alias>, models:/<name>/<version>"
                            " or models:/<model id>") from None
    if parsed.stage:
        raise PipelineError(f"{uri}: {parsed.stage} is a stage, and this pipeline's versions have none (MLflow "
                            f"deprecated stages for aliases): name an alias, models:/{parsed.name}@{CHAMPION} or "
                            f"@<net>, or a version, models:/{parsed.name}/<number>")
    if not store_exists():
        raise PipelineError(f"{uri}: no MLflow store at {tracking_uri()}")
    connect()
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as folder:
        try:
            named = get_model_name_and_version(client, uri)
            version = client.get_model_version(*named) if len(named) == 2 else None
            # The version found, not the URI again: an alias moved meanwhile would load another.
            exact = f"{MODELS_URI}{version.name}/{version.version}" if version else uri
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=exact, dst_path=folder))
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                cause = " ".join(str(error.message).split()).rstrip(".")
                raise PipelineError(f"{uri}: not in the MLflow store {tracking_uri()} ({cause})") from None
            raise store_failure(error, f"{uri} was not loaded") from None
        check_model(uri, local)
        try:
            return Loaded(mlflow.pyfunc.load_model(str(local)), version)
        except MlflowException as error:
            raise store_failure(error, f"{uri} was not loaded") from None


def check_model(uri: str, folder: Path) -> None:
    """Refuse a model that is not one of this pipeline's, reading its files and importing none:

    - its flavour: a Python model from code (no pickled model, no code_paths put on the import path);
    - its code: this checkout's pipeline/tracking/pyfunc_model.py, byte for byte (its SHA-256);
    - its artifacts: the exported net and the column names, and its signature: faces in, pixels out.

    What the checked code then loads, the exported net, is the archive the version holds: a store
    open to anyone lets anyone replace it (docs/scale-out.md: run the server with authentication).
    """
    def refuse(why: str) -> PipelineError:
        return PipelineError(f"{uri}: not loaded, since it is not a model of this pipeline: {why}")

    try:
        metadata = Model.load(str(folder / "MLmodel"))
    except Exception as error:  # noqa: BLE001 - whatever a damaged MLmodel raises, the model is refused
        raise refuse(f"its MLmodel file is not readable ({' '.join(str(error).split())[:200]})") from None
    flavour = metadata.flavors.get("python_function") or {}
    if flavour.get("loader_module") != CODE_LOADER or not flavour.get("model_code_path"):
        raise refuse(f"it is loaded by {flavour.get('loader_module')}, not from the code of pyfunc_model.py")
    if flavour.get("code"):
        raise refuse(f"it puts code of its own on Python's import path ({flavour['code']})")
    code = folder / Path(str(flavour["model_code_path"])).name
    ours = Path(pyfunc_model.__file__)
    if not code.is_file() or _sha256(code) != _sha256(ours):
        found = _sha256(code)[:12] if code.is_file() else "missing"
        raise refuse(f"its code {code.name} (SHA-256 {found}) is not this pipeline's {ours.name} "
                     f"({_sha256(ours)[:12]}): logged by another version of the pipeline, or by someone else")
    artifacts = {name: artifact.get("path") for name, artifact in (flavour.get("artifacts") or {}).items()}
    if artifacts != ARTIFACTS:
        raise refuse(f"its artifacts are {sorted(artifacts)}, not {sorted(ARTIFACTS)}")
    if metadata.signature != MODEL_SIGNATURE:
        raise refuse("its signature is not 96x96 uint8 faces in and the 30 keypoints in pixels out (a model "
                     "logged before the models spoke pixels, or another's)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def warn_if_not_workspace(uri: str, loaded: Loaded, workspace_weights: dict[str, set[str]]) -> None:
    """One line when an alias names a version of a net whose weights are none of the workspace's
    trainings of that net (`workspace_weights`: by net, the checksums its models' .json files record),
    as after `dvc exp apply`."""
    if loaded.version is None or "@" not in uri:
        return
    net, weights = loaded.version.tags.get(NET_TAG), loaded.version.tags.get(WEIGHTS_TAG)
    if net in workspace_weights and weights not in workspace_weights[net]:
        print(f"warning: {uri} is version {loaded.version.version}, whose weights are not this workspace's model of "
              f"{net}: run `python -m pipeline.promote` to point the aliases at the workspace's models",
              file=sys.stderr)
