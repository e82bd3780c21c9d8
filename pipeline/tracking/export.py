"""The trained net as an MLflow model that speaks pixels: its export, its signature, its example."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from pipeline.faces.data import pixels_of, unscale_keypoints
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS
from pipeline.tracking import pyfunc_model
from pipeline.tracking.store import environment_set

# The logged model's: faces of 8-bit gray levels (uint8: every value 0..255 is one) in, keypoints in pixels out.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
    outputs=Schema([ColSpec(DataType.float, column) for column in KEYPOINT_COLUMNS]),
)
# The faces the net is exported from: from one, torch.export would fix the batch to 1.
EXPORT_FACES = 2


def example_faces(images: torch.Tensor) -> np.ndarray:
    """The first faces of the net's input (float (n, 1, 96, 96) in 0..1, on any device) as the logged
    model takes faces, uint8 (n, 96, 96): faces of the data the net trained on, for log_model."""
    return pixels_of(images[:EXPORT_FACES, 0].cpu().numpy())


def log_model(model: torch.nn.Module, faces: np.ndarray) -> None:
    """Log the net to the active run as an MLflow model that speaks pixels and loads on any machine.
    `faces` (uint8 (n, 96, 96): example_faces of the data it trained on) are what it is exported
    from, and the first is its input example.

    The model (pyfunc_model.py, MLflow's "model from code") takes 96x96 faces of 8-bit gray levels
    and returns the 30 keypoints in pixels under Kaggle's column names. The net is exported with
    its conversions from levels and to pixels (PixelNet), so that the served model converts as the
    pipeline does and needs no code of the project; torch.export fixes the device of the weights,
    so the copy exported is on the CPU, wherever the net trained.
    """
    # MLflow checks the input example by loading the model back: no progress bars among the epochs' lines.
    with tempfile.TemporaryDirectory() as folder, environment_set(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.__file__,
            artifacts=_model_artifacts(model, faces, Path(folder)),
            signature=MODEL_SIGNATURE,
            input_example=faces[:1],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )


class PixelNet(torch.nn.Module):
    """The net from uint8 faces (n, 96, 96) to keypoints in pixels: the conversions of images_of and
    unscale_keypoints around it, in float32 as pipeline.predict computes them."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return unscale_keypoints(self.net((faces.to(torch.float32) / 255).unsqueeze(1)))


def _model_artifacts(model: torch.nn.Module, faces: np.ndarray, folder: Path) -> dict[str, str]:
    """The exported PixelNet and the output columns' names, as files in `folder`, by artifact name.

    Exported from EXPORT_FACES faces with a dynamic batch dimension; a training of one face lends it twice.
    """
    net = PixelNet(copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval())
    batch = torch.from_numpy(np.resize(faces, (EXPORT_FACES, IMAGE_SIZE, IMAGE_SIZE)))
    exported = torch.export.export(net, (batch,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    paths = {pyfunc_model.NET_ARTIFACT: folder / "net.pt2", pyfunc_model.COLUMNS_ARTIFACT: folder / "columns.json"}
    torch.export.save(exported, paths[pyfunc_model.NET_ARTIFACT])
    paths[pyfunc_model.COLUMNS_ARTIFACT].write_text(json.dumps(list(KEYPOINT_COLUMNS)))
    return {name: str(path) for name, path in paths.items()}
