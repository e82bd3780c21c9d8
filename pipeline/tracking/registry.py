"""MLflow's Model Registry: every trained net's model a version of one registered model, tagged with
what it is and how it tested; aliases for each net's version and the champion; loading a version.

The evaluate stage registers, since only it knows the test RMSE a version is tagged with and the
champion is chosen by: a version registered by the training would lack both until then.
"""

from __future__ import annotations

import mlflow
from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version

from pipeline.base.errors import PipelineError
from pipeline.tracking.runs import MODEL_SIGNATURE, WEIGHTS_TAG
from pipeline.tracking.store import TrackingError, connect, store_calls, store_exists, store_failure, tracking_uri

REGISTERED_MODEL = "facial-keypoints"
CHAMPION = "champion"
MODELS_URI = "models:/"
# A version's tags: the net and its data, as its training run has them, and its test figure.
NET_TAG = "net"
DATA_TAG = "data_hash"
RMSE_TAG = "test_rmse_px"
DESCRIPTION = ("The nets of the facial-keypoints pipeline: uint8 faces (n, 96, 96), gray levels 0..255, in; "
               "the 30 keypoints in pixels, under Kaggle's column names, out. One version per trained net's "
               "weights; aliases: each net's name, and champion on the net with the lowest test RMSE.")


def register(run: Run, test_rmse_px: float) -> ModelVersion:
    """The version of the model `run` trained, with its test RMSE, and the net's alias on it.

    Weights already registered (the same net evaluated again, or trained again to the same weights)
    are that version, so a rerun adds none; weights of an earlier training, brought back by `dvc
    checkout`, take the net's alias back, so that models:/facial-keypoints@<net> is models/<net>.pt.
    """
    client = mlflow.MlflowClient()
    net = run.data.tags[NET_TAG]
    with store_calls(f"{net}'s model was not registered as {REGISTERED_MODEL}"):
        version = _version_of(client, net, run.data.tags[WEIGHTS_TAG]) or _new_version(client, run)
        tested = repr(float(test_rmse_px))  # all its digits, as evaluate.json has them
        if version.tags.get(RMSE_TAG) != tested:
            client.set_model_version_tag(REGISTERED_MODEL, version.version, RMSE_TAG, tested)
        client.set_registered_model_alias(REGISTERED_MODEL, net, version.version)
        return client.get_model_version(REGISTERED_MODEL, version.version)


def crown(versions: dict[str, ModelVersion]) -> ModelVersion:
    """The champion alias on the version of the lowest test RMSE among the nets evaluated together (the
    first net on a tie): the net the report names the best, tested on the same faces as its rivals."""
    champion = min(versions.values(), key=lambda version: float(version.tags[RMSE_TAG]))
    with store_calls(f"the {CHAMPION} alias was not set on {REGISTERED_MODEL}"):
        mlflow.MlflowClient().set_registered_model_alias(REGISTERED_MODEL, CHAMPION, champion.version)
    return champion


def _version_of(client: mlflow.MlflowClient, net: str, weights: str) -> ModelVersion | None:
    """The version of these weights of the net, if registered: the first, should two evaluations have raced."""
    found = client.search_model_versions(
        f"name = '{REGISTERED_MODEL}' AND tags.{NET_TAG} = '{net}' AND tags.{WEIGHTS_TAG} = '{weights}'",
        order_by=["version_number ASC"], max_results=1)
    return found[0] if found else None


def _new_version(client: mlflow.MlflowClient, run: Run) -> ModelVersion:
    """A new version of the run's logged model, tagged as the run is (net, weights, data)."""
    run_id = run.info.run_id
    logged = [model for model in client.search_logged_models([run.info.experiment_id],
                                                            filter_string=f"source_run_id = '{run_id}'")
              if model.status == LoggedModelStatus.READY]
    if not logged:
        raise TrackingError(f"run {run_id} has no model to register as {REGISTERED_MODEL}")
    try:
        client.create_registered_model(REGISTERED_MODEL, description=DESCRIPTION)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {key: run.data.tags[key] for key in (NET_TAG, WEIGHTS_TAG, DATA_TAG)}
    return client.create_model_version(REGISTERED_MODEL, logged[0].model_uri, run_id=run_id, tags=tags,
                                       model_id=logged[0].model_id)


def is_model_uri(name: str) -> bool:
    """A models:/ URI rather than a net's name: no net of params.yaml can be named so (":" and "/")."""
    return name.startswith(MODELS_URI)


def load(uri: str) -> tuple[mlflow.pyfunc.PyFuncModel, str]:
    """The model a models:/ URI names, on the CPU, and what it is in a few words ("version 3, net5, ...").

    Refused in one line: a store that is not there (not created here), a URI that names nothing in
    it, and a model that is not one of this pipeline's pixel models (a model logged before they were).
    """
    try:
        _parse_model_uri(uri)  # MLflow's own parser: asks no store
    except MlflowException:
        raise PipelineError(f"{uri}: not a models:/ URI of MLflow: models:/<name>@<alias>, models:/<name>/<version>"
                            " or models:/<model id>") from None
    if not store_exists():
        raise PipelineError(f"{uri}: no MLflow store at {tracking_uri()}")
    connect()
    client = mlflow.MlflowClient()
    try:
        named = get_model_name_and_version(client, uri)
        version = client.get_model_version(*named) if len(named) == 2 else None
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            cause = " ".join(str(error.message).split()).rstrip(".")
            raise PipelineError(f"{uri}: not in the MLflow store {tracking_uri()} ({cause})") from None
        raise store_failure(error, f"{uri} was not loaded") from None
    if model.metadata.signature != MODEL_SIGNATURE:
        raise PipelineError(f"{uri}: not a model of this pipeline's signature (96x96 uint8 faces in, the 30 "
                            "keypoints in pixels out): one logged before the models spoke pixels, or another's")
    return model, _described(model, version)


def _described(model: mlflow.pyfunc.PyFuncModel, version: ModelVersion | None) -> str:
    run = f"MLflow run {model.metadata.run_id}"
    if version is None:
        return run
    tags = version.tags
    tested = f", test RMSE {float(tags[RMSE_TAG]):.2f} px" if RMSE_TAG in tags else ""
    return f"version {version.version} of {version.name}: {tags.get(NET_TAG)}, data {tags.get(DATA_TAG)}{tested}, {run}"
