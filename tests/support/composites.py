"""Nets of groups of keypoints cut out of a trained net, and a composite of them, in a scratch project:
the composite of a net's own outputs is that net, which the tests of composites compare with."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.base.config import keypoint_columns, load_config
from pipeline.base.weights import load_checked, save_checked, checksum
from pipeline.base.model import OUTPUT_LAYER
from pipeline.faces.kaggle import KEYPOINTS
from pipeline.tracking.trained_by import WEIGHTS_TAG
from tests.support.project import set_params

# Two groups that cover the 15 keypoints: the eyes and eyebrows (ten), and the five others.
EYES = tuple(name for name in KEYPOINTS if name.startswith(("left_eye", "right_eye")))
GROUPS = {"eyes": EYES, "rest": tuple(name for name in KEYPOINTS if name not in EYES)}
COMPOSITE = "split"


def cut_into_groups(project: Path, source: str = "net4", groups: dict | None = None,
                    composite: str = COMPOSITE) -> dict[str, tuple[str, ...]]:
    """Nets of `groups` (by name, their keypoints) whose weights are `source`'s with only their columns of
    the output layer, trained as params.yaml now says (models/<net>.json, as a training writes it), and
    composite `composite` of them in params.yaml; the groups."""
    groups = groups or GROUPS
    set_params(project, {**{f"nets.{net}": {"flip": False, "keypoints": list(keypoints)}
                            for net, keypoints in groups.items()},
                         "composites": {composite: list(groups)}})
    config = load_config(project / "params.yaml")
    state = load_checked(project / "models" / f"{source}.pt", remedy="")
    info = json.loads((project / "models" / f"{source}.json").read_text())
    for net, keypoints in groups.items():
        rows = list(keypoint_columns(keypoints))
        cut = {key: value[rows] if key.startswith(OUTPUT_LAYER) else value for key, value in state.items()}
        save_checked(project / "models" / f"{net}.pt", cut)
        (project / "models" / f"{net}.json").write_text(json.dumps({
            **info, "net": net, "config": config.training_params(net, config.train.seeds[0]),
            WEIGHTS_TAG: checksum(cut)}, indent=2))
    return groups
