"""params.yaml read once into frozen dataclasses, checked before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.base.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
# Seeds go to numpy, which refuses negative ones, and to torch, which takes at most 64 bits (the
# flips' generator gets seed + 1): 32 bits suit every generator there is.
MAX_SEED = 2**32 - 1
# The weights a training saves: those of the epoch with the lowest valid loss, or of the last epoch.
KEEP = ("best", "last")


@dataclass(frozen=True)
class PathsConfig:
    synthetic_csv: str
    prepared: str
    models: str
    metrics: str
    plots: str
    reports: str
    checkpoints: str

    @property
    def train_faces(self) -> Path:
        return Path(self.prepared) / "train.npz"

    @property
    def test_faces(self) -> Path:
        return Path(self.prepared) / "test.npz"

    @property
    def prepared_summary(self) -> Path:
        return Path(self.prepared) / "summary.json"

    @property
    def comparison_report(self) -> Path:
        return Path(self.reports) / "comparison.md"

    def checkpoint(self, net: str) -> Path:
        """The state of an unfinished training; outside every stage's outputs, which DVC deletes."""
        return Path(self.checkpoints) / f"{net}.pt"

    def training_lock(self, net: str) -> Path:
        """Held by the one process training `net` in this project."""
        return Path(self.checkpoints) / f"{net}.lock"

    def model(self, net: str) -> Path:
        return Path(self.models) / f"{net}.pt"

    def model_info(self, net: str) -> Path:
        """The resolved config, the data hash and the kept epoch, saved beside the weights."""
        return Path(self.models) / f"{net}.json"

    def history(self, net: str) -> Path:
        return Path(self.metrics) / "history" / f"{net}.csv"

    def train_metrics(self, net: str) -> Path:
        return Path(self.metrics) / "train" / f"{net}.json"


@dataclass(frozen=True)
class DataConfig:
    source: str
    csv: str

    def __post_init__(self):
        _require(self.source in ("synthetic", "csv"), "data.source", "must be synthetic or csv")


@dataclass(frozen=True)
class SyntheticConfig:
    n_faces: int
    missing_fraction: float
    seed: int

    def __post_init__(self):
        _require(self.n_faces >= 1, "synthetic.n_faces", "must be at least 1")
        _require(0 <= self.missing_fraction < 1, "synthetic.missing_fraction", "must be in [0, 1)")
        _require_seed(self.seed, "synthetic.seed")


@dataclass(frozen=True)
class PrepareConfig:
    test_fraction: float
    seed: int

    def __post_init__(self):
        _require(0 < self.test_fraction < 1, "prepare.test_fraction", "must be strictly between 0 and 1")
        _require_seed(self.seed, "prepare.seed")


@dataclass(frozen=True)
class Schedule:
    start: float
    stop: float


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int
    patience: int
    keep: str
    batch_size: int
    valid_fraction: float
    seed: int
    device: str
    deterministic: bool
    channels_last: bool
    bf16: bool
    cuda_graphs: bool
    schedules: dict[str, Schedule]

    def __post_init__(self):
        _require(self.max_epochs >= 1, "train.max_epochs", "must be at least 1")
        _require(self.patience >= 0, "train.patience", "must be 0 (no early stopping) or more")
        _require(self.keep in KEEP, "train.keep", f"must be {' or '.join(KEEP)}")
        _require(self.batch_size >= 1, "train.batch_size", "must be at least 1")
        _require(0 < self.valid_fraction < 1, "train.valid_fraction", "must be strictly between 0 and 1")
        _require_seed(self.seed, "train.seed")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "train.device", "must be auto, cpu, cuda or cuda:N",
        )
        _require("lr" in self.schedules, "train.schedules", "must schedule lr (the learning rate)")
        lr = self.schedules["lr"]
        _require(lr.start > 0 and lr.stop > 0, "train.schedules.lr", "start and stop must be positive")
        # Nesterov SGD needs a momentum to start from; it may anneal towards 0 later.
        _require("momentum" in self.schedules, "train.schedules", "must schedule momentum")
        momentum = self.schedules["momentum"]
        _require(
            0 < momentum.start < 1 and 0 <= momentum.stop < 1,
            "train.schedules.momentum", "start must be in (0, 1) and stop in [0, 1)",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    """How often an unfinished training's state is saved; it never changes what is trained."""

    interval_seconds: float

    def __post_init__(self):
        _require(self.interval_seconds >= 0, "checkpoint.interval_seconds", "must be 0 (every epoch) or more")


@dataclass(frozen=True)
class EvaluateConfig:
    """The paired bootstrap over the test faces that puts an interval on every comparison."""

    bootstrap_resamples: int
    seed: int

    def __post_init__(self):
        # Fewer resamples leave the 2.5% and 97.5% percentiles resting on a handful of draws.
        _require(self.bootstrap_resamples >= 100, "evaluate.bootstrap_resamples", "must be at least 100")
        _require_seed(self.seed, "evaluate.seed")


@dataclass(frozen=True)
class NetConfig:
    flip: bool


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    data: DataConfig
    synthetic: SyntheticConfig
    prepare: PrepareConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    evaluate: EvaluateConfig
    nets: dict[str, NetConfig]

    @property
    def source_csv(self) -> Path:
        return Path(self.paths.synthetic_csv if self.data.source == "synthetic" else self.data.csv)

    def net(self, name: str) -> NetConfig:
        if name not in self.nets:
            raise PipelineError(f"unknown net {name!r}: params.yaml defines {', '.join(sorted(self.nets))}")
        return self.nets[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Path = PARAMS_FILE) -> Config:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the project root)") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    try:
        return _build(Config, raw, "")
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys, as MLflow params and `dvc exp run -S` spell them."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _require_seed(seed: int, key: str) -> None:
    _require(0 <= seed <= MAX_SEED, key, f"must be an integer in 0..{MAX_SEED}")


def _require(condition: bool, key: str, rule: str) -> None:
    if not condition:
        raise PipelineError(f"{key} {rule}")


def _build(kind, value, key: str):
    """Build `kind` from parsed YAML, naming the dotted key of the first thing that does not fit."""
    where = key or "the top level"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise PipelineError(f"{where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        names = [f.name for f in dataclasses.fields(kind)]
        for name in value:
            if name not in names:
                guess = difflib.get_close_matches(str(name), names, n=1)
                hint = f" (did you mean {_join(key, guess[0])}?)" if guess else ""
                raise PipelineError(f"unknown key {_join(key, name)}{hint}")
        missing = [name for name in names if name not in value]
        if missing:
            raise PipelineError(f"missing key {_join(key, missing[0])}")
        built = {name: _build(hints[name], value[name], _join(key, name)) for name in value}
        return kind(**built)
    if origin is dict:
        _, item_kind = typing.get_args(kind)
        if not isinstance(value, dict) or not value:
            raise PipelineError(f"{where} must be a non-empty mapping, got {value!r}")
        return {str(name): _build(item_kind, item, _join(key, name)) for name, item in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise PipelineError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise PipelineError(f"{where} must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"no rule to build {kind} for {where}")


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)
