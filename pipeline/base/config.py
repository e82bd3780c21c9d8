"""params.yaml read once into frozen dataclasses, checked before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.error import MarkedYAMLError

from pipeline.base.errors import PipelineError
from pipeline.base.params_file import PARAMS_FILE
from pipeline.base.text import shown
from pipeline.base.shapes import FLIP_PAIRS, HIDDEN, KEYPOINT_COLUMNS, KEYPOINTS

# Seeds go to numpy, which refuses negative ones, and to torch, which takes at most 64 bits (the
# flips' generator gets seed + 1): 32 bits suit every generator there is.
MAX_SEED = 2**32 - 1
# The weights a training saves: those of the epoch with the lowest valid loss, or of the last epoch.
KEEP = ("best", "last")
# Which keypoints the synthetic set's partly labelled rows lack (pipeline.faces.synthetic._choose_missing_keypoints):
# random ones (70% of the rows all 11 outer keypoints, the others some of them), or all 11 outer ones, as Kaggle's.
MISSING_PATTERNS = ("random", "kaggle")
# The options of NetConfig that are model.KeypointNet's keywords, and those that are train keys.
MODEL_OPTIONS = ("dropout", "hidden")
TRAIN_OVERRIDES = ("max_epochs", "patience")
# A net's name is part of file names (models/<net>.pt, its lock), of DVC's stage and command
# (train@<net>) and of MLflow's keys: no separator, space or dot-dot can escape or split them.
NET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# A registered model's name: a models:/<name>@<alias> URI must split it from what follows.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Short enough for every file named after a net (its checkpoint's lock, <net>.json, a temporary file
# beside it) to stay far below the 255 bytes a file name may have.
MAX_NET_NAME = 64
# A key longer than this is shown cut short (text.shown), like a value.
MAX_KEY = 64
# Upper bounds of sizes that can only be mistakes, each far beyond any use of this pipeline: past them
# the stages would fail for memory (9 GB of pixels a million faces) or run for years.
MAX_FACES = 1_000_000
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_HIDDEN = 100_000
MAX_RESAMPLES = 1_000_000
# Names taken elsewhere: evaluation's name of the mean-shape baseline, and aliases that the Model
# Registry gives another meaning (the best net's alias; MLflow's own latest and v<N>).
RESERVED_NET_NAMES = re.compile(r"baseline|champion|latest|v\d+", re.IGNORECASE)
# Mappings that may be empty, {}: params.yaml has `composites: {}` so that DVC, which refuses a params key
# that params.yaml lacks, can list it among evaluate's params.
MAY_BE_EMPTY = ("composites",)
# The values params.yaml may hold once its anchors' aliases are expanded: the file has about 40, and a
# few aliases of a net's settings stay far below; a "billion laughs" of nested aliases goes far above.
MAX_EXPANDED_VALUES = 10_000


@dataclass(frozen=True)
class PathsConfig:
    synthetic_csv: str
    prepared: str
    models: str
    metrics: str
    plots: str
    reports: str
    checkpoints: str
    training_runs: str

    @property
    def train_faces(self) -> Path:
        return Path(self.prepared) / "train.npz"

    @property
    def test_faces(self) -> Path:
        return Path(self.prepared) / "test.npz"

    @property
    def train_incomplete_faces(self) -> Path:
        """The training portion of the faces lacking some keypoints (NaN), split apart from the complete ones."""
        return Path(self.prepared) / "train_incomplete.npz"

    @property
    def test_incomplete_faces(self) -> Path:
        return Path(self.prepared) / "test_incomplete.npz"

    @property
    def prepared_summary(self) -> Path:
        return Path(self.prepared) / "summary.json"

    @property
    def comparison_report(self) -> Path:
        return Path(self.reports) / "comparison.md"

    @property
    def test_figures(self) -> Path:
        """evaluate.json: each net's test RMSE, which the champion is chosen by (pipeline.promote too)."""
        return Path(self.metrics) / "evaluate.json"

    def checkpoint(self, net: str, seed: int | None = None) -> Path:
        """The state of an unfinished training. Not a stage output: a finished training deletes it,
        and as an output DVC would cache each one (96 MB)."""
        return Path(self.checkpoints) / (f"{net}.pt" if seed is None else f"{net}-seed{seed}.pt")

    def training_lock(self, net: str) -> Path:
        """Held by the one process training `net` in this project."""
        return Path(self.checkpoints) / f"{net}.lock"

    # A net's files. `seed` None: the training under the first seed of train.seeds, whose files are the
    # net's own, as they were before seeds were listed; another seed's are in the net's folder of seeds.

    def model(self, net: str, seed: int | None = None) -> Path:
        return Path(self.models) / f"{net}.pt" if seed is None else self.seeds_folder(net) / f"seed{seed}.pt"

    def model_info(self, net: str, seed: int | None = None) -> Path:
        """What trained the weights beside it: the params (Config.training_params), the data hash, the
        kept epoch, the MLflow run and the weights' checksum."""
        return Path(self.models) / f"{net}.json" if seed is None else self.seeds_folder(net) / f"seed{seed}.json"

    def history(self, net: str, seed: int | None = None) -> Path:
        if seed is None:
            return Path(self.metrics) / "history" / f"{net}.csv"
        return self.seeds_folder(net) / f"seed{seed}-history.csv"

    def train_metrics(self, net: str, seed: int | None = None) -> Path:
        if seed is None:
            return Path(self.metrics) / "train" / f"{net}.json"
        return self.seeds_folder(net) / f"seed{seed}-train.json"

    def seeds_folder(self, net: str) -> Path:
        """The files of the net's trainings under the seeds after the first: one output of train@<net>
        (empty with one seed), so that dvc.yaml declares them whatever train.seeds lists."""
        return Path(self.models) / f"{net}-seeds"

    def seeds_index(self, net: str) -> Path:
        """The seeds whose trainings the net's folder of seeds holds, and the first, whose files are the net's own."""
        return self.seeds_folder(net) / "seeds.json"


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
    missing_pattern: str
    seed: int

    def __post_init__(self):
        _require_within(self.n_faces, 1, MAX_FACES, "synthetic.n_faces")
        _require(0 <= self.missing_fraction < 1, "synthetic.missing_fraction", "must be in [0, 1)")
        _require(self.missing_pattern in MISSING_PATTERNS, "synthetic.missing_pattern",
                 f"must be {' or '.join(MISSING_PATTERNS)}, got {shown(self.missing_pattern)}")
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
    seeds: tuple[int, ...]
    device: str
    deterministic: bool
    channels_last: bool
    bf16: bool
    tf32: bool
    cuda_graphs: bool
    portable_cpu: bool
    schedules: dict[str, Schedule]

    def __post_init__(self):
        _require_max_epochs(self.max_epochs, "train.max_epochs")
        _require_patience(self.patience, "train.patience")
        _require(self.keep in KEEP, "train.keep", f"must be {' or '.join(KEEP)}")
        _require_within(self.batch_size, 1, MAX_BATCH_SIZE, "train.batch_size")
        _require(0 < self.valid_fraction < 1, "train.valid_fraction", "must be strictly between 0 and 1")
        _require_seeds(self.seeds, "train.seeds")
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


    def of_seed(self, seed: int) -> dict:
        """train.* as one training of the list reads it: its own seed, as `seed`, where the list stands.
        A training's records (models/<net>.json, its MLflow params, its checkpoint) name the seed that
        made it, and stay as they are when other seeds join the list."""
        return {("seed" if name == "seeds" else name): (seed if name == "seeds" else value)
                for name, value in dataclasses.asdict(self).items()}


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
        _require_within(self.bootstrap_resamples, 100, MAX_RESAMPLES, "evaluate.bootstrap_resamples")
        _require_seed(self.seed, "evaluate.seed")


@dataclass(frozen=True)
class RegistryConfig:
    """The project's registered model in MLflow's Model Registry (pipeline.tracking.registry)."""

    # Each project sharing a tracking store needs its own: the aliases on it follow one workspace.
    model_name: str

    def __post_init__(self):
        _require(MODEL_NAME.fullmatch(self.model_name) is not None, "registry.model_name",
                 "must be ASCII letters, digits, _, - and ., starting with a letter or digit "
                 "(it is part of models:/ URIs)")


@dataclass(frozen=True)
class NetConfig:
    """A net of `nets`: the seed's network, with flips or without, unless it sets the options after
    `flip`. An option left out is None (model.KeypointNet's default, or train.*'s value), so a net
    is recorded (`to_dict`) with the keys it was given, and net4's and net5's records stay as they were."""

    flip: bool
    # The rates after the three pooling blocks and after the first dense layer (the tutorial's net6).
    dropout: tuple[float, float, float, float] | None = None
    # The two dense layers' width (the tutorial's net7: 1000).
    hidden: int | None = None
    # The train keys a net may set for itself (TRAIN_OVERRIDES): net7 trains longer and stops early.
    max_epochs: int | None = None
    patience: int | None = None
    # The keypoints it predicts, by Kaggle's names without _x/_y (absent: all 15): the tutorial's specialists.
    keypoints: tuple[str, ...] | None = None
    # Trained on every face labelled for one of its keypoints at least, the loss over the labelled
    # coordinates only; without it, on the faces labelled for all of them (the tutorial's rule).
    masked: bool | None = None
    # The net whose kept weights (under the same seed) start every layer but the output layer.
    init_from: str | None = None

    def check(self, key: str) -> None:
        """Its values' rules, naming them under `key` (nets.<name>), which the net does not know itself."""
        if self.keypoints is not None:
            _require_keypoints(self.keypoints, f"{key}.keypoints")
            if self.flip:
                _require_whole_flip_pairs(self.keypoints, key)
        for index, rate in enumerate(self.dropout or ()):
            _require(0 <= rate < 1, f"{key}.dropout[{index}]", "must be a rate in [0, 1)")
        if self.hidden is not None:
            _require_within(self.hidden, 1, MAX_HIDDEN, f"{key}.hidden")
        if self.max_epochs is not None:
            _require_max_epochs(self.max_epochs, f"{key}.max_epochs")
        if self.patience is not None:
            _require_patience(self.patience, f"{key}.patience")

    def model_options(self) -> dict:
        """The options of model.KeypointNet this net sets; the others are the seed's."""
        options = {name: getattr(self, name) for name in MODEL_OPTIONS if getattr(self, name) is not None}
        return {**options, "outputs": len(self.columns)} if self.keypoints is not None else options

    @property
    def columns(self) -> tuple[int, ...]:
        """The columns of KEYPOINT_COLUMNS it predicts, in their order there: its outputs, x then y of each keypoint."""
        return keypoint_columns(self.keypoints)

    def to_dict(self) -> dict:
        """The keys it was given, as params.yaml spells them (the dropout rates as a list)."""
        return {field.name: list(value) if isinstance(value, tuple) else value
                for field in dataclasses.fields(self) if (value := getattr(self, field.name)) is not None}


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    data: DataConfig
    synthetic: SyntheticConfig
    prepare: PrepareConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    evaluate: EvaluateConfig
    registry: RegistryConfig
    nets: dict[str, NetConfig]
    # Predictors made of nets whose keypoints are disjoint and cover all 15: the tutorial's specialists, combined.
    composites: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in self.nets:
            _require_model_name(name, "nets")
            self.nets[name].check(f"nets.{name}")
        for name in self.nets:
            self._check_start(name)
        for name, members in self.composites.items():
            _require_model_name(name, "composites")
            _require(name not in self.nets, f"composites.{name}", "is also the name of a net: name it otherwise")
            self._check_composite(name, members)

    def _check_start(self, name: str) -> None:
        """nets.<name>.init_from names another net, of the same width, not started from `name` in turn."""
        key, source = f"nets.{name}.init_from", self.nets[name].init_from
        if source is None:
            return
        _require(source in self.nets, key, f"names {shown(source)}, which is no net of `nets` "
                                           f"({', '.join(self.nets)})")
        _require(source != name, key, f"names {name} itself: a net starts from another's weights")
        names = list(self.nets)
        _require(names.index(source) < names.index(name), key,
                 f"names {source}, which `nets` lists after {name}: list {source} first (DVC trains the nets in the "
                 "order `nets` lists them, and a net starts from weights already trained)")
        chain = [name, source]
        while (following := self.nets[chain[-1]].init_from) is not None:
            _require(following not in chain, key, f"makes a cycle: {' <- '.join([*chain, following])}")
            chain.append(following)
        widths = [self.nets[net].hidden or HIDDEN for net in (name, source)]
        _require(widths[0] == widths[1], key, f"names {source}, whose dense layers are {widths[1]} wide, where "
                                              f"{name}'s are {widths[0]} (nets.<net>.hidden): its weights cannot fit")

    def _check_composite(self, name: str, members: tuple[str, ...]) -> None:
        """composites.<name> lists nets of `nets` whose keypoints are disjoint and cover all 15."""
        key = f"composites.{name}"
        _require(len(members) > 0, key, "must list one net at least")
        owner: dict[str, str] = {}
        for index, member in enumerate(members):
            _require(member in self.nets, f"{key}[{index}]", f"names {shown(member)}, which is no net of `nets`")
            for keypoint in self.nets[member].keypoints or KEYPOINTS:
                _require(keypoint not in owner, key, f"has {keypoint} twice: in {owner.get(keypoint)} and in {member} "
                                                     "(each keypoint from one net)")
                owner[keypoint] = member
        missing = [keypoint for keypoint in KEYPOINTS if keypoint not in owner]
        _require(not missing, key, f"lacks {', '.join(missing)}: its nets must cover all {len(KEYPOINTS)} keypoints")

    @property
    def source_csv(self) -> Path:
        return Path(self.paths.synthetic_csv if self.data.source == "synthetic" else self.data.csv)

    @property
    def full_nets(self) -> list[str]:
        """The nets that predict all 15 keypoints: those scored on their own, beside the composites."""
        return [name for name, net in self.nets.items() if net.keypoints is None or len(net.columns) == len(KEYPOINT_COLUMNS)]

    @property
    def predictors(self) -> list[str]:
        """What answers all 30 columns: the full nets, then the composites; evaluate compares them."""
        return [*self.full_nets, *self.composites]

    def net(self, name: str) -> NetConfig:
        if name not in self.nets:
            raise PipelineError(f"unknown net {shown(name)}: params.yaml defines {', '.join(sorted(self.nets))}")
        return self.nets[name]

    def train_of(self, name: str) -> TrainConfig:
        """train.* as net `name` trains: with its own values of the keys it may set (TRAIN_OVERRIDES)."""
        net = self.net(name)
        return dataclasses.replace(self.train, **{key: getattr(net, key) for key in TRAIN_OVERRIDES
                                                  if getattr(net, key) is not None})

    def training_params(self, name: str, seed: int) -> dict:
        """What train reads that shapes net `name`'s weights under `seed`, as params.yaml spells it:
        train.* with the net's own values (train_of) and the seed (TrainConfig.of_seed), and nets.<name>.
        models/<net>.json records it; evaluate checks it."""
        return {"train": self.train_of(name).of_seed(seed), "nets": {name: self.net(name).to_dict()}}

    def files_seed(self, seed: int) -> int | None:
        """The `seed` argument of PathsConfig's files of a training under `seed`: None for the first
        seed of train.seeds, whose files are the net's own."""
        return None if seed == self.train.seeds[0] else seed

    def to_dict(self) -> dict:
        """The params as params.yaml spells them: each net with the keys it was given."""
        return {**dataclasses.asdict(self), "nets": {name: net.to_dict() for name, net in self.nets.items()}}


def keypoint_columns(keypoints: tuple[str, ...] | None) -> tuple[int, ...]:
    """The columns of KEYPOINT_COLUMNS (x, y) of `keypoints` (None: all 15), in Kaggle's order whatever theirs."""
    chosen = set(KEYPOINTS if keypoints is None else keypoints)
    return tuple(column for index, name in enumerate(KEYPOINTS) if name in chosen for column in (2 * index, 2 * index + 1))


def _require_keypoints(keypoints: tuple[str, ...], key: str) -> None:
    _require(len(keypoints) > 0, key, "must list one keypoint at least (leave it out for all 15)")
    for index, name in enumerate(keypoints):
        guess = difflib.get_close_matches(name, KEYPOINTS, n=1)
        _require(name in KEYPOINTS, f"{key}[{index}]",
                 f"{shown(name)} is not a keypoint: Kaggle's names without _x/_y, such as "
                 f"{guess[0] if guess else KEYPOINTS[0]}")
        _require(name not in keypoints[:index], key, f"lists {name} twice")


def _require_whole_flip_pairs(keypoints: tuple[str, ...], key: str) -> None:
    """A flip swaps each left keypoint with its right one: a net that has one of them cannot flip."""
    for left, right in FLIP_PAIRS:
        if left % 2:
            continue  # the pairs are of columns: the x column names the keypoint
        pair = KEYPOINTS[left // 2], KEYPOINTS[right // 2]
        lone = [side for side in pair if side in keypoints]
        if len(lone) == 1:
            other = pair[1 - pair.index(lone[0])]
            raise PipelineError(f"{key}.flip is true, but {key}.keypoints has {lone[0]} without {other}: a flip "
                                f"turns one into the other, so the net cannot flip (set flip: false, or add {other})")


def _require_model_name(name: str, key: str) -> None:
    """A net's or a composite's name: it names files, DVC stages and the Model Registry's aliases."""
    if len(name) > MAX_NET_NAME:
        raise PipelineError(f"{key}: {shown(name)} is a name of {len(name)} characters: at most {MAX_NET_NAME} "
                            "(it names files and DVC stages)")
    if not NET_NAME.fullmatch(name):
        raise PipelineError(f"{key}: {shown(name)} is not a net name: use ASCII letters, digits, _ and -, "
                            "starting with a letter or digit (it names files and DVC stages)")
    if RESERVED_NET_NAMES.fullmatch(name):
        raise PipelineError(f"{key}: {shown(name)} is taken: the evaluation or the Model Registry uses that name "
                            "for something else (baseline, champion, latest, v<N>)")


def load_config(path: Path = PARAMS_FILE) -> Config:
    try:
        raw = read_params(Path(path).read_text())
        _require_small_expansion(raw)
        return _build(Config, raw, "")
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the project root)") from None
    except YAMLError as error:
        raise PipelineError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None


def read_params(text: str):
    """YAML as DVC reads params.yaml (dvc.utils.serialize.parse_yaml: ruamel.yaml, YAML 1.2), so that the
    stages train with the values dvc.lock and `dvc exp show` record: `010` is ten, `1:30` and `on` are
    strings, where YAML 1.1 (PyYAML) reads eight, ninety and true."""
    try:
        return YAML(typ="safe").load(text)
    except ValueError:  # Python's limit on converting long digit strings, reached inside the parser
        raise PipelineError(f"holds an integer of more than {sys.get_int_max_str_digits()} digits, which no "
                            "param can be") from None


def _yaml_problem(error: YAMLError) -> str:
    """The parser's problem and where, in one line; its own message quotes the file over many."""
    if not isinstance(error, MarkedYAMLError) or not error.problem:
        return " ".join(str(error).split())
    mark = error.problem_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{' '.join(error.problem.split())}{where}"


def _require_small_expansion(raw) -> None:
    """Refuse anchors and aliases that expand to more than MAX_EXPANDED_VALUES values, or into themselves.

    The parser shares an aliased node rather than copying it, so the file loads at once; but every
    walk of its values (building the config, flattening it for MLflow, DVC's templating context of
    dvc.yaml) visits each alias's expansion again: a few lines can stand for billions of values."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in walking:
            raise PipelineError("an alias refers to the anchor it is within, an endless value: write the values out")
        walking.add(id(node))
        children = node.values() if isinstance(node, dict) else node
        sizes[id(node)] = min(1 + sum(size(child) for child in children), MAX_EXPANDED_VALUES + 1)
        walking.discard(id(node))
        return sizes[id(node)]

    if size(raw) > MAX_EXPANDED_VALUES:
        raise PipelineError(f"its anchors and aliases expand to more than {MAX_EXPANDED_VALUES} values (nested "
                            "aliases of aliases): write the values out, or alias fewer")


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys, as MLflow params and `dvc exp run -S` spell them."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _require_max_epochs(max_epochs: int, key: str) -> None:
    _require_within(max_epochs, 1, MAX_EPOCHS, key)


def _require_within(value: int, lowest: int, highest: int, key: str) -> None:
    _require(lowest <= value <= highest, key, f"must be in {lowest}..{highest:_}, got {shown(value)}")


def _require_patience(patience: int, key: str) -> None:
    _require(patience >= 0, key, "must be 0 (no early stopping) or more")


def _require_seed(seed: int, key: str) -> None:
    _require(0 <= seed <= MAX_SEED, key, f"must be an integer in 0..{MAX_SEED}")


def _require_seeds(seeds: tuple[int, ...], key: str) -> None:
    _require(len(seeds) > 0, key, "must list one seed at least, such as [42]")
    for index, seed in enumerate(seeds):
        _require_seed(seed, f"{key}[{index}]")
        # A seed twice is one training counted twice: the pooled figures would weigh it double.
        _require(seed not in seeds[:index], key, f"lists {seed} twice: each seed is one training, once")


def _require(condition: bool, key: str, rule: str) -> None:
    if not condition:
        raise PipelineError(f"{key} {rule}")


def _build(kind, value, key: str):
    """Build `kind` from parsed YAML, naming the dotted key of the first thing that does not fit."""
    where = key or "the top level"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise PipelineError(f"{where} must be a mapping, got {shown(value)}")
        hints = typing.get_type_hints(kind)
        names = [f.name for f in dataclasses.fields(kind)]
        for name in value:
            if name not in names:
                guess = difflib.get_close_matches(str(name), names, n=1)
                hint = f" (did you mean {_join(key, guess[0])}?)" if guess else ""
                raise PipelineError(f"unknown key {_join(key, name)}{hint}")
        missing = [name for name in names if name not in value and name in _required(kind)]
        if missing:
            raise PipelineError(f"missing key {_join(key, missing[0])}")
        built = {name: _build(hints[name], value[name], _join(key, name)) for name in value}
        return kind(**built)
    if origin is types.UnionType:
        # An optional key (`int | None = None`): None stands for its absence, so a value given is of the other kind.
        (given_kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return _build(given_kind, value, key)
    if origin is tuple and typing.get_args(kind)[1:] == (Ellipsis,):
        if not isinstance(value, list):
            raise PipelineError(f"{where} must be a list, such as [1, 2, 3], got {shown(value)}")
        return tuple(_build(typing.get_args(kind)[0], item, f"{key}[{index}]") for index, item in enumerate(value))
    if origin is tuple:
        item_kinds = typing.get_args(kind)
        if not isinstance(value, list) or len(value) != len(item_kinds):
            raise PipelineError(f"{where} must be a list of {len(item_kinds)} values, got {shown(value)}")
        return tuple(_build(item_kind, item, f"{key}[{index}]")
                     for index, (item_kind, item) in enumerate(zip(item_kinds, value)))
    if origin is dict:
        _, item_kind = typing.get_args(kind)
        if not isinstance(value, dict) or (not value and key not in MAY_BE_EMPTY):
            raise PipelineError(f"{where} must be a non-empty mapping, got {shown(value)}")
        return {str(name): _build(item_kind, item, _join(key, name)) for name, item in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"{where} must be true or false, got {shown(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{where} must be an integer, got {shown(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{where} must be a number, got {shown(value)}")
        if not math.isfinite(value):
            raise PipelineError(f"{where} must be a finite number, got {shown(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise PipelineError(f"{where} must be a non-empty string, got {shown(value)}")
        return value
    raise TypeError(f"no rule to build {kind} for {where}")


def _required(kind) -> list[str]:
    """The fields of dataclass `kind` without a default: the keys params.yaml must give."""
    return [field.name for field in dataclasses.fields(kind)
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]


def _join(prefix: str, name) -> str:
    name = str(name) if len(str(name)) <= MAX_KEY else shown(name)
    return f"{prefix}.{name}" if prefix else name
