"""The prepared faces a run uses, as MLflow dataset inputs: where they came from, never the arrays."""

from __future__ import annotations

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.faces.kaggle import KEYPOINT_COLUMNS

# The portions of the prepared faces a run uses, by the context MLflow shows them under.
PORTIONS = {"training": "train", "validation": "valid", "test": "test"}
# Where the faces come from: a CSV in the layout of Kaggle's training.csv, keypoints in pixels, some missing.
CSV_SCHEMA = Schema([*(ColSpec(DataType.double, column, required=False) for column in KEYPOINT_COLUMNS),
                     ColSpec(DataType.string, "Image")])


def faces_inputs(summary: dict, **faces: int) -> list[DatasetInput]:
    """The portions of the prepared faces a run uses, by context (training=1632, ...), as MLflow dataset
    inputs: the CSV they came from, the prepared data's hash (prepare's summary), the CSV's columns.

    No arrays: DVC keeps those. The number of faces is in the name, since MLflow keeps one dataset per
    name and digest: a training with another valid_fraction uses other datasets of the same data.
    """
    return [
        DatasetInput(
            MetaDataset(LocalArtifactDatasetSource(summary["source"]), name=f"{PORTIONS[context]}: {count} faces",
                        digest=summary["data_hash"], schema=CSV_SCHEMA)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )
        for context, count in faces.items()
    ]
