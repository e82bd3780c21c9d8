"""The code of the MLflow model a training logs (MLflow's "models from code"): what
`mlflow.pyfunc.load_model(...)` and `mlflow models serve` run.

MLflow copies this file into the logged model and runs it to load the model, on machines that
may not have the project: it imports no module of the pipeline. What it needs comes with the
model as two artifacts, written by pipeline.tracking.runs.log_model: the net, exported by
torch.export with the conversions from gray levels and to pixels inside it, and the names of
its 30 outputs.
"""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pandas as pd
import torch

# The artifacts' names, shared with runs.log_model (which imports this module to find the file).
NET_ARTIFACT = "net"
COLUMNS_ARTIFACT = "columns"
# Faces at a time, as the pipeline predicts them: Kaggle's 1783 test faces at once would take 2 GB.
BATCH = 256
# The brightest level of a face that is surely not one of gray levels 0..255: a face scaled to 0..1,
# which the server's conversion to uint8 turns into levels 0 and 1.
DARKEST_FACE = 1
LOG = logging.getLogger("facial_keypoints")


class FacialKeypoints(mlflow.pyfunc.PythonModel):
    """uint8 faces (n, 96, 96), gray levels 0..255 -> a table of the 30 keypoints in pixels, one row per face."""

    def load_context(self, context) -> None:
        # On the CPU, where it was exported: a serving machine needs no GPU, and gets the same figures.
        self.net = torch.export.load(context.artifacts[NET_ARTIFACT]).module()
        with open(context.artifacts[COLUMNS_ARTIFACT]) as stream:
            self.columns = json.load(stream)

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # MLflow has checked the input against the signature (uint8, 96x96); the type hint only quiets
        # its advice to add one, since an array's hint infers no signature.
        faces = torch.from_numpy(np.ascontiguousarray(model_input))
        dark = int((faces.flatten(1).amax(1) <= DARKEST_FACE).sum())
        if dark:
            LOG.warning("%d of %d faces have no gray level above %d, all black: the model takes gray levels 0..255, "
                        "and faces scaled to 0..1 reach it as levels 0 and 1", dark, len(faces), DARKEST_FACE)
        with torch.inference_mode():
            pixels = [self.net(batch).numpy() for batch in faces.split(BATCH)]
        return pd.DataFrame(np.concatenate(pixels), columns=self.columns)


# How a model from code names its model to MLflow, which runs this file to load it.
mlflow.models.set_model(FacialKeypoints())
