"""A models:/ URI names a model that predict loads only once its files are checked: a model with code of
its own is refused before that code runs, and a stage is said to be none of this pipeline's."""

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import predict
from pipeline.tracking.export import MODEL_SIGNATURE
from pipeline.tracking.store import connect

EVIL_CODE = '''
import pathlib

import mlflow


class Evil(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


pathlib.Path({marker!r}).write_text("the model's own code ran")
mlflow.models.set_model(Evil())
'''


@pytest.fixture
def face(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(np.full((96, 96), 128, np.uint8)).save(path)
    return path


@pytest.mark.slow  # a store created and a model logged: 10-20 s
def test_a_registered_model_with_code_of_its_own_is_refused_before_the_code_runs(tmp_path, face, capsys):
    marker = tmp_path / "ran.txt"
    code = tmp_path / "evil.py"
    code.write_text(EVIL_CODE.format(marker=str(marker)))
    connect()
    with mlflow.start_run():
        # This pipeline's signature, so that only the code tells it apart.
        mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=MODEL_SIGNATURE,
                                registered_model_name="evil")
    marker.unlink(missing_ok=True)  # logging it may run it: what counts is predict
    output = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit) as exit_:
        predict.main([str(face), "--net", "models:/evil/1", "--output", str(output)])
    assert exit_.value.code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: models:/evil/1: not loaded, since it is not a model of this pipeline: its code "
                            "evil.py (SHA-256 ")
    assert "is not this pipeline's pyfunc_model.py" in error
    assert not marker.exists() and not output.exists()


def test_a_stage_is_said_to_be_no_stage_of_this_pipeline(face, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict.main([str(face), "--net", "models:/facial-keypoints/Production", "--output", str(tmp_path / "p.csv")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: models:/facial-keypoints/Production: Production is a stage, and this pipeline's versions have none "
        "(MLflow deprecated stages for aliases): name an alias, models:/facial-keypoints@champion or @<net>, or a "
        "version, models:/facial-keypoints/<number>\n")
