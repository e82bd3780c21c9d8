import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dvc.utils.serialize import parse_yaml

from pipeline.base.config import MAX_EXPANDED_VALUES, flatten, load_config
from pipeline.base.errors import PipelineError
from pipeline.faces.kaggle import KEYPOINTS
from pipeline.train import main as train_main
from tests.support.project import DEFAULT_PARAMS, default_config, default_params


def write_params(tmp_path, change):
    params = default_params()
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))  # `nets` in its order, which init_from relies on
    return path


def test_project_params_load():
    config = default_config()
    assert config.data.source == "synthetic"
    assert set(config.nets) == {"net4", "net5"}
    assert config.nets["net5"].flip and not config.nets["net4"].flip
    assert config.train.schedules["lr"].start == 0.03 and config.train.schedules["lr"].stop == 0.0001
    assert config.train.schedules["momentum"].start == 0.9 and config.train.schedules["momentum"].stop == 0.999
    assert flatten(config.to_dict())["train.schedules.lr.start"] == 0.03


def expect_error(tmp_path, change, *fragments):
    with pytest.raises(PipelineError) as caught:
        load_config(write_params(tmp_path, change))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_key_suggests_the_right_one(tmp_path):
    expect_error(tmp_path, lambda p: p["train"].update(max_epoch=3), "unknown key train.max_epoch", "did you mean train.max_epochs")


def test_missing_key_is_named(tmp_path):
    expect_error(tmp_path, lambda p: p["train"].pop("batch_size"), "missing key train.batch_size")


@pytest.mark.parametrize("key, value, fragment", [
    ("max_epochs", 0, "train.max_epochs must be in 1..100_000, got 0"),
    ("max_epochs", 10**10, "train.max_epochs must be in 1..100_000, got 10000000000"),
    ("batch_size", 10**9, "train.batch_size must be in 1..65_536"),
    ("max_epochs", 2.5, "train.max_epochs must be an integer"),
    ("max_epochs", True, "train.max_epochs must be an integer"),
    ("valid_fraction", 1.0, "train.valid_fraction must be strictly between 0 and 1"),
    ("device", "tpu", "train.device must be"),
    ("deterministic", "yes", "train.deterministic must be true or false"),
])
def test_bad_train_values_are_named(tmp_path, key, value, fragment):
    expect_error(tmp_path, lambda p: p["train"].update({key: value}), fragment)


def test_bad_schedule_values_are_named(tmp_path):
    expect_error(tmp_path, lambda p: p["train"]["schedules"]["lr"].update(start=-1), "train.schedules.lr")
    expect_error(tmp_path, lambda p: p["train"]["schedules"]["momentum"].update(stop=1.0), "train.schedules.momentum")


@pytest.mark.parametrize("value, fragment", [
    (-1, "checkpoint.interval_seconds must be 0 (every epoch) or more"),
    (float("nan"), "checkpoint.interval_seconds must be a finite number"),
    ("1m", "checkpoint.interval_seconds must be a number"),
])
def test_bad_checkpoint_interval_is_named(tmp_path, value, fragment):
    expect_error(tmp_path, lambda p: p["checkpoint"].update(interval_seconds=value), fragment)


@pytest.mark.parametrize("section, key, value", [
    ("synthetic", "seed", lambda seed: seed), ("prepare", "seed", lambda seed: seed),
    ("train", "seeds", lambda seed: [1, seed]),
])
@pytest.mark.parametrize("seed", [-1, 10**29, 2**32])
def test_seeds_outside_every_generators_range_are_named(tmp_path, section, key, value, seed):
    named = f"{section}.{key}" + ("[1]" if key == "seeds" else "")
    expect_error(tmp_path, lambda p: p[section].update({key: value(seed)}), f"{named} must be an integer in 0..4294967295")


def test_the_largest_seed_trains_its_flips_too(tmp_path):
    config = load_config(write_params(tmp_path, lambda p: p["train"].update(seeds=[2**32 - 1])))
    torch.Generator().manual_seed(config.train.seeds[0] + 1)
    np.random.default_rng(config.train.seeds[0])


@pytest.mark.parametrize("seeds, message", [
    ([], "train.seeds must list one seed at least, such as [42]"),
    ([1, 2, 1], "train.seeds lists 1 twice: each seed is one training, once"),
    ([1, 2.5], "train.seeds[1] must be an integer, got 2.5"),
    ([1, True], "train.seeds[1] must be an integer, got True"),
    ([1, "2"], "train.seeds[1] must be an integer, got '2'"),
    (7, "train.seeds must be a list, such as [1, 2, 3], got 7"),
    ({"a": 1}, "train.seeds must be a list, such as [1, 2, 3], got {'a': 1}"),
])
def test_a_seed_list_that_is_empty_repeats_or_holds_no_integer_is_refused_in_one_line(tmp_path, seeds, message):
    path = write_params(tmp_path, lambda p: p["train"].update(seeds=seeds))
    with pytest.raises(PipelineError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {message}"


def test_the_old_single_seed_key_is_refused_with_its_successor_named(tmp_path):
    path = write_params(tmp_path, lambda p: p["train"].update(seed=42))
    with pytest.raises(PipelineError, match=r"unknown key train.seed \(did you mean train.seeds\?\)"):
        load_config(path)


def test_each_training_records_its_own_seed_where_the_list_stands(tmp_path):
    config = load_config(write_params(tmp_path, lambda p: p["train"].update(seeds=[3, 1, 2])))
    train = config.training_params("net4", 1)["train"]
    assert list(train) == [("seed" if name == "seeds" else name) for name in dataclasses.asdict(config.train)]
    assert train["seed"] == 1
    assert [config.files_seed(seed) for seed in (3, 1, 2)] == [None, 1, 2]
    assert config.paths.model("net4") == Path("models/net4.pt")
    assert config.paths.model("net4", 2) == Path("models/net4-seeds/seed2.pt")
    assert config.paths.history("net4", 2).parent == config.paths.seeds_folder("net4")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(tmp_path, value):
    expect_error(tmp_path, lambda p: p["train"]["schedules"]["lr"].update(start=value),
                 "train.schedules.lr.start must be a finite number")


def test_bad_source_and_flip(tmp_path):
    expect_error(tmp_path, lambda p: p["data"].update(source="kaggle"), "data.source must be synthetic or csv")
    expect_error(tmp_path, lambda p: p["nets"]["net5"].update(flip="yes"), "nets.net5.flip must be true or false")


@pytest.mark.parametrize("value, fragment", [
    ("Kaggle", "synthetic.missing_pattern must be random or kaggle, got 'Kaggle'"),
    (1, "synthetic.missing_pattern must be a non-empty string, got 1"),
])
def test_a_bad_missing_pattern_is_named(tmp_path, value, fragment):
    expect_error(tmp_path, lambda p: p["synthetic"].update(missing_pattern=value), fragment)
    assert default_config().synthetic.missing_pattern == "random"  # today's pattern, so today's CSV
    assert load_config(write_params(tmp_path, lambda p: p["synthetic"].update(missing_pattern="kaggle"))
                       ).synthetic.missing_pattern == "kaggle"


def test_unknown_net_is_named():
    with pytest.raises(PipelineError, match="unknown net 'net9'"):
        default_config().net("net9")


def test_broken_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path):
    """Python refuses to convert it, inside the parser: a ValueError traceback before."""
    path = write_params(tmp_path, lambda params: params["prepare"].update(seed=123454321))
    path.write_text(path.read_text().replace("123454321", "9" * 5000))
    with pytest.raises(PipelineError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: holds an integer of more than 4300 digits, which no param can be"


def test_the_yaml_error_says_the_problem_and_its_line_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(PipelineError) as caught:
        load_config(path)
    assert str(caught.value) == (f'{path}: not valid YAML: found duplicate key "seed" with value "2" '
                                 '(original value: "1") (line 3, column 3)')


# Scalars that YAML 1.1 (PyYAML) and YAML 1.2 (DVC's ruamel.yaml) read differently.
DIALECT_SCALARS = {"prepare.seed": "010", "train.max_epochs": "0o3", "data.csv": "1:30", "train.deterministic": "on"}


def params_with_scalars(scalars: dict[str, str]) -> str:
    """DEFAULT_PARAMS with each dotted key's value written as the bare scalar given, and a net named on."""
    params = default_params()
    for dotted, scalar in scalars.items():
        section, key = dotted.split(".")
        params[section][key] = f"<{dotted}>"
    params["nets"]["<on>"] = {"flip": True}
    text = yaml.safe_dump(params, sort_keys=False).replace("<on>:", "on:")
    for dotted, scalar in scalars.items():
        text = text.replace(f"<{dotted}>", scalar)
    return text


def test_params_are_read_as_dvc_reads_them_whatever_yaml_11_says(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(params_with_scalars(DIALECT_SCALARS))
    # true to YAML 1.1, the string "on" to DVC: refused, rather than trained as deterministic.
    with pytest.raises(PipelineError, match="train.deterministic must be true or false, got 'on'"):
        load_config(path)
    scalars = {key: value for key, value in DIALECT_SCALARS.items() if key != "train.deterministic"}
    text = params_with_scalars(scalars)
    path.write_text(text)
    assert yaml.safe_load(text)["prepare"]["seed"] == 8 and True in yaml.safe_load(text)["nets"]  # YAML 1.1's reading
    dvc, config = flatten(parse_yaml(text, str(path))), load_config(path)
    loaded = flatten(config.to_dict())
    assert {key: loaded[key] for key in scalars} == {key: dvc[key] for key in scalars} == {
        "prepare.seed": 10, "train.max_epochs": 3, "data.csv": "1:30"}
    assert "on" in config.nets and dvc["nets.on.flip"] is True


def test_a_few_aliases_load_and_aliases_of_aliases_beyond_the_limit_are_refused_at_once(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(DEFAULT_PARAMS.replace("  net5:\n", "  net6: &net6\n    flip: true\n  net7: *net6\n  net5:\n"))
    assert load_config(path).nets["net7"] == load_config(path).nets["net6"]
    laughs = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]" for level in range(1, 10)]
    path.write_text(DEFAULT_PARAMS + "\n".join(laughs) + "\n")  # 10**10 values
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        load_config(path)
    assert time.monotonic() - started < 1
    assert str(caught.value) == (f"{path}: its anchors and aliases expand to more than {MAX_EXPANDED_VALUES} values "
                                 "(nested aliases of aliases): write the values out, or alias fewer")
    path.write_text(DEFAULT_PARAMS + "loop: &loop [1, *loop]\n")
    with pytest.raises(PipelineError, match="an alias refers to the anchor it is within"):
        load_config(path)


@pytest.mark.parametrize("key, value, fragment", [
    ("keep", "first", "train.keep must be best or last"),
    ("keep", None, "train.keep must be a non-empty string"),
    ("patience", -1, "train.patience must be 0 (no early stopping) or more"),
    ("patience", 2.5, "train.patience must be an integer"),
])
def test_bad_keep_or_patience_is_one_line(tmp_path, key, value, fragment):
    expect_error(tmp_path, lambda p: p["train"].update({key: value}), fragment)


NET6 = {"flip": True, "dropout": [0.1, 0.2, 0.3, 0.5]}
NET7 = {**NET6, "hidden": 1000, "max_epochs": 3000, "patience": 200}


def with_net(name, settings):
    return lambda params: params["nets"].update({name: settings})


def test_the_tutorials_net6_and_net7_load_with_their_options(tmp_path):
    config = load_config(write_params(tmp_path, lambda p: p["nets"].update(net6=NET6, net7=NET7)))
    assert config.nets["net6"].dropout == (0.1, 0.2, 0.3, 0.5) and config.nets["net6"].hidden is None
    assert config.nets["net6"].model_options() == {"dropout": (0.1, 0.2, 0.3, 0.5)}
    assert config.nets["net7"].model_options() == {"dropout": (0.1, 0.2, 0.3, 0.5), "hidden": 1000}
    # A net's own max_epochs and patience replace train's for it alone.
    assert (config.train_of("net7").max_epochs, config.train_of("net7").patience) == (3000, 200)
    assert config.train_of("net6") == config.train_of("net4") == config.train


def test_nets_are_recorded_with_the_keys_they_were_given(tmp_path):
    config = load_config(write_params(tmp_path, lambda p: p["nets"].update(net6=NET6, net7=NET7)))
    assert config.to_dict()["nets"] == {"net4": {"flip": False}, "net5": {"flip": True}, "net6": NET6, "net7": NET7}
    assert flatten(config.to_dict())["nets.net6.dropout"] == [0.1, 0.2, 0.3, 0.5]


@pytest.mark.parametrize("settings, fragment", [
    ({**NET6, "dropout": [0.1, 1.0, 0.3, 0.5]}, "nets.net6.dropout[1] must be a rate in [0, 1)"),
    ({**NET6, "dropout": [0.1, -0.2, 0.3, 0.5]}, "nets.net6.dropout[1] must be a rate in [0, 1)"),
    ({**NET6, "dropout": [0.1, 0.2, 0.3]}, "nets.net6.dropout must be a list of 4 values, got [0.1, 0.2, 0.3]"),
    ({**NET6, "dropout": 0.5}, "nets.net6.dropout must be a list of 4 values, got 0.5"),
    ({**NET6, "dropout": None}, "nets.net6.dropout must be a list of 4 values, got None"),
    ({**NET6, "dropout": [0.1, "a", 0.3, 0.5]}, "nets.net6.dropout[1] must be a number, got 'a'"),
    ({**NET6, "hidden": 0}, "nets.net6.hidden must be in 1..100_000, got 0"),
    ({**NET6, "hidden": 10_000_000}, "nets.net6.hidden must be in 1..100_000, got 10000000"),
    ({**NET6, "hidden": 1000.0}, "nets.net6.hidden must be an integer"),
    ({**NET6, "max_epochs": 0}, "nets.net6.max_epochs must be in 1..100_000"),
    ({**NET6, "patience": -1}, "nets.net6.patience must be 0 (no early stopping) or more"),
    ({**NET6, "dropuot": [0.1, 0.2, 0.3, 0.5]}, "unknown key nets.net6.dropuot (did you mean nets.net6.dropout?)"),
    ({**NET6, "batch_size": 64}, "unknown key nets.net6.batch_size"),
    ({"dropout": [0.1, 0.2, 0.3, 0.5]}, "missing key nets.net6.flip"),
])
def test_bad_net_options_are_named(tmp_path, settings, fragment):
    expect_error(tmp_path, with_net("net6", settings), fragment)


@pytest.mark.parametrize("name", ["../../escape", "net/6", "net 6", "-net6", "nét6", ".."])
def test_a_net_name_that_is_no_file_or_stage_name_is_refused_naming_nets(tmp_path, name):
    expect_error(tmp_path, lambda p: p["nets"].update({name: {"flip": True}}),
                 f"nets: {name!r} is not a net name: use ASCII letters, digits, _ and -")


@pytest.mark.parametrize("name", ["baseline", "champion", "Latest", "v2"])
def test_a_net_name_the_evaluation_or_the_registry_means_otherwise_is_refused(tmp_path, name):
    expect_error(tmp_path, lambda p: p["nets"].update({name: {"flip": True}}), f"nets: {name!r} is taken")


@pytest.mark.parametrize("name", ["net6", "Net_6", "6", "net-6b", "v2b", "baselines"])
def test_net_names_of_letters_digits_underscores_and_dashes_load(tmp_path, name):
    assert name in load_config(write_params(tmp_path, lambda p: p["nets"].update({name: {"flip": True}}))).nets


def test_a_training_of_a_net_named_as_a_path_writes_nothing_outside_the_project(tmp_path, monkeypatch, capsys):
    """The train stage refuses it before taking the net's lock, which would lie outside the project."""
    project = tmp_path / "a" / "project"
    project.mkdir(parents=True)
    write_params(project, lambda p: p["nets"].update({"../../escape": {"flip": True}}))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_:
        train_main(["../../escape"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: params.yaml: nets: '../../escape' is not a net name")
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["a", "params.yaml", "project"]


@pytest.mark.parametrize("section, key, value, fragment", [
    ("synthetic", "n_faces", 1_000_000_000, "synthetic.n_faces must be in 1..1_000_000, got 1000000000"),
    ("evaluate", "bootstrap_resamples", 1_000_000_000, "evaluate.bootstrap_resamples must be in 100..1_000_000"),
    ("evaluate", "bootstrap_resamples", 99, "evaluate.bootstrap_resamples must be in 100..1_000_000, got 99"),
])
def test_sizes_that_can_only_be_mistakes_are_refused(tmp_path, section, key, value, fragment):
    expect_error(tmp_path, lambda p: p[section].update({key: value}), fragment)


@pytest.mark.parametrize("change", [
    lambda p: p["train"].update(device="x" * 100_000),
    lambda p: p["train"].update(batch_size=[list(range(1000))] * 1000),
    lambda p: p["train"].update(keep={"k" * 10_000: "v" * 10_000}),
    lambda p: p["train"].update(seeds=[10**1000]),
    lambda p: p["nets"].update({"n" * 10_000: {"flip": "yes"}}),
    lambda p: p["nets"]["net4"].update({"x" * 10_000: 1}),
])
def test_an_error_shows_at_most_80_characters_of_a_value_or_key(tmp_path, change):
    with pytest.raises(PipelineError) as caught:
        load_config(write_params(tmp_path, change))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message


def test_a_net_name_of_more_than_64_characters_is_refused_before_any_stage(tmp_path):
    """248 characters broke every other net's training after its data was loaded (its lock's file name)."""
    name = "n" * 65
    expect_error(tmp_path, lambda p: p["nets"].update({name: {"flip": True}}),
                 "is a name of 65 characters: at most 64")
    assert "n" * 64 in load_config(write_params(tmp_path, lambda p: p["nets"].update({"n" * 64: {"flip": True}}))).nets


EYES = ["left_eye_center", "right_eye_center"]
GROUPS = {"eyes": EYES, "nose": ["nose_tip"]}


def with_nets(nets, composites=None):
    def change(params):
        params["nets"].update(nets)
        if composites is not None:
            params["composites"] = composites
    return change


def test_a_group_net_predicts_its_keypoints_columns_in_kaggles_order_and_records_only_what_it_was_given(tmp_path):
    config = load_config(write_params(tmp_path, with_nets(
        {"eyes": {"flip": True, "keypoints": ["right_eye_center", "left_eye_center"], "masked": True}})))
    assert config.nets["eyes"].columns == (0, 1, 2, 3)
    assert config.nets["eyes"].model_options() == {"outputs": 4}
    assert config.nets["net4"].columns == tuple(range(30)) and config.nets["net4"].model_options() == {}
    assert config.to_dict()["nets"]["net4"] == {"flip": False}
    assert config.full_nets == ["net4", "net5"] and config.predictors == ["net4", "net5"]


def test_composites_of_disjoint_groups_covering_every_keypoint_load(tmp_path):
    rest = [name for name in KEYPOINTS if name not in EYES]
    config = load_config(write_params(tmp_path, with_nets(
        {"eyes": {"flip": True, "keypoints": EYES, "init_from": "net5"}, "rest": {"flip": False, "keypoints": rest}},
        {"pair": ["eyes", "rest"], "whole": ["net4"]})))
    assert config.composites == {"pair": ("eyes", "rest"), "whole": ("net4",)}
    assert config.predictors == ["net4", "net5", "pair", "whole"]


@pytest.mark.parametrize("nets, composites, fragment", [
    ({"eyes": {"flip": False, "keypoints": ["left_eye"]}}, None,
     "nets.eyes.keypoints[0] 'left_eye' is not a keypoint: Kaggle's names without _x/_y, such as left_eye_center"),
    ({"eyes": {"flip": False, "keypoints": ["nose_tip_x"]}}, None, "nets.eyes.keypoints[0] 'nose_tip_x' is not a keypoint"),
    ({"eyes": {"flip": False, "keypoints": []}}, None, "nets.eyes.keypoints must list one keypoint at least"),
    ({"eyes": {"flip": False, "keypoints": ["nose_tip", "nose_tip"]}}, None, "nets.eyes.keypoints lists nose_tip twice"),
    ({"eyes": {"flip": True, "keypoints": ["left_eye_center", "nose_tip"]}}, None,
     "nets.eyes.flip is true, but nets.eyes.keypoints has left_eye_center without right_eye_center"),
    ({"eyes": {"flip": True, "keypoints": ["right_eyebrow_outer_end"]}}, None,
     "nets.eyes.keypoints has right_eyebrow_outer_end without left_eyebrow_outer_end"),
    ({"eyes": {"flip": False, "masked": "yes"}}, None, "nets.eyes.masked must be true or false"),
    ({"eyes": {"flip": False, "init_from": "net9"}}, None, "nets.eyes.init_from names 'net9', which is no net of `nets`"),
    ({"eyes": {"flip": False, "init_from": "eyes"}}, None, "nets.eyes.init_from names eyes itself"),
    ({"eyes": {"flip": False, "init_from": "net5", "hidden": 1000}}, None,
     "nets.eyes.init_from names net5, whose dense layers are 500 wide, where eyes's are 1000"),
    ({"eyes": {"flip": False, "init_from": "later"}, "later": {"flip": False}}, None,
     "nets.eyes.init_from names later, which `nets` lists after eyes: list later first"),
    ({"eyes": {"flip": True, "keypoints": EYES}}, {"pair": ["eyes", "net4"]},
     "composites.pair has left_eye_center twice: in eyes and in net4"),
    ({"eyes": {"flip": True, "keypoints": EYES}}, {"pair": ["eyes"]},
     "composites.pair lacks left_eye_inner_corner, left_eye_outer_corner"),
    ({}, {"pair": ["net9"]}, "composites.pair[0] names 'net9', which is no net of `nets`"),
    ({}, {"net5": ["net4"]}, "composites.net5 is also the name of a net"),
    ({}, {"champion": ["net4"]}, "composites: 'champion' is taken"),
    ({}, {"pair": []}, "composites.pair must list one net at least"),
])
def test_bad_groups_starts_and_composites_are_refused_in_one_line_naming_the_key(tmp_path, nets, composites, fragment):
    expect_error(tmp_path, with_nets(nets, composites), fragment)


def test_a_cycle_of_starts_is_refused_naming_it(tmp_path):
    def change(params):
        params["nets"] = {"a": {"flip": False, "init_from": "b"}, "b": {"flip": False, "init_from": "a"}}
    # Whichever comes first names the other, listed after it.
    expect_error(tmp_path, change, "nets.a.init_from names b, which `nets` lists after a")
