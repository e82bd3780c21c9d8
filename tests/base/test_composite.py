"""Composites (pipeline/base/composite.py): nets of groups of keypoints side by side, as arrays and as a model."""

import numpy as np
import pytest
import torch

from pipeline.base.composite import Composite, combine
from pipeline.base.config import keypoint_columns
from pipeline.base.model import KeypointNet
from pipeline.evaluation.metrics import predict
from tests.support.composites import GROUPS

COLUMNS = [keypoint_columns(keypoints) for keypoints in GROUPS.values()]


def test_combine_puts_each_members_answers_in_its_own_columns():
    faces = 4
    answers = [np.arange(faces * len(columns), dtype=np.float32).reshape(faces, -1) + 1000 * index
               for index, columns in enumerate(COLUMNS)]
    combined = combine(COLUMNS, answers)
    assert combined.shape == (faces, 30) and combined.dtype == np.float32
    for columns, answer in zip(COLUMNS, answers):
        assert np.array_equal(combined[:, list(columns)], answer)


def test_a_composites_answer_equals_its_nets_answers_put_side_by_side():
    members = [KeypointNet(outputs=len(columns)).eval() for columns in COLUMNS]
    images = np.random.default_rng(0).random((5, 1, 96, 96), dtype=np.float32)
    composite = Composite(members, COLUMNS).eval()
    assert np.array_equal(predict(composite, images), combine(COLUMNS, [predict(net, images) for net in members]))


@pytest.mark.parametrize("columns", [[(0, 1), (2, 3)], [tuple(range(30)), (0, 1)]], ids=["missing", "overlapping"])
def test_members_that_miss_or_repeat_a_column_are_refused(columns):
    with pytest.raises(ValueError, match="each of the 30 columns once"):
        Composite([torch.nn.Identity() for _ in columns], columns)
    with pytest.raises(ValueError, match="each of the 30 columns once"):
        combine(columns, [np.zeros((1, len(member))) for member in columns])
