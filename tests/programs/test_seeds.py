"""train.seeds through `dvc repro`: every net trained once per seed, each in its MLflow run; evaluate
pools the seeds; the registry's champion is the net of the lowest mean, on its best seed."""

import hashlib
import json

import mlflow
import pytest

from tests.support.project import copy_project, run, set_params

pytestmark = pytest.mark.slow

NETS = ("net4", "net5")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reproduce(project, seeds):
    set_params(project, {"train.seeds": seeds})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        return run(project, "dvc", "repro")


def test_three_seeds_train_each_net_three_times_and_one_seed_gives_todays_outputs_again(reproduced, tmp_path):
    project = copy_project(reproduced, tmp_path / "project")
    lead_files = [f"models/{net}.pt" for net in NETS] + [f"metrics/history/{net}.csv" for net in NETS]
    one_seed = {name: sha256(project / name) for name in [*lead_files, "metrics/evaluate.json"]}
    assert [path.name for path in (project / "models/net4-seeds").iterdir()] == ["seeds.json"]

    printed = reproduce(project, [42, 7, 3]).stdout
    # The first seed's files are the net's own, the same bytes as with one seed.
    assert {name: sha256(project / name) for name in lead_files} == {name: one_seed[name] for name in lead_files}
    for net in NETS:
        assert sorted(path.name for path in (project / f"models/{net}-seeds").iterdir()) == [
            *(f"seed{seed}{suffix}" for seed in (3, 7) for suffix in ("-history.csv", "-train.json", ".json", ".pt")),
            "seeds.json"]
        assert json.loads((project / f"models/{net}-seeds/seeds.json").read_text()) == {
            "net": net, "first_seed": 42, "seeds_here": [7, 3]}
        assert json.loads((project / f"models/{net}-seeds/seed7.json").read_text())["config"]["train"]["seed"] == 7
    assert "train net4 under seed 7 (2 of 3)" in printed

    figures = json.loads((project / "metrics/evaluate.json").read_text())
    for net in NETS:
        per_seed = [figures[net]["seeds"][seed]["test_rmse_px"] for seed in ("42", "7", "3")]
        assert figures[net]["test_rmse_px"] == pytest.approx(sum(per_seed) / 3)
        assert len(set(per_seed)) == 3 and figures[net]["test_rmse_px_sd"] > 0
    report = (project / "reports/comparison.md").read_text()
    n_test = json.loads((project / "data/prepared/summary.json").read_text())["n_test"]
    assert f"3 seeds x {n_test} test faces)" in report.splitlines()[0]
    assert "paired two-level bootstrap" in report

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facial-keypoints")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    trained = {(run.data.tags["net"], run.data.params["seed"]) for run in runs if "seed" in run.data.params}
    assert trained == {(net, seed) for net in NETS for seed in ("42", "7", "3")}
    # The champion: the net of the lower mean, on its version of the lowest test RMSE.
    best_net = min(NETS, key=lambda net: figures[net]["test_rmse_px"])
    best_seed = min(figures[best_net]["seeds"], key=lambda seed: figures[best_net]["seeds"][seed]["test_rmse_px"])
    champion = client.get_model_version_by_alias("facial-keypoints", "champion")
    assert (champion.tags["net"], champion.tags["seed"], champion.tags["net_seeds"]) == (best_net, best_seed, "3")
    assert float(champion.tags["net_mean_test_rmse_px"]) == pytest.approx(figures[best_net]["test_rmse_px"])
    assert client.get_model_version_by_alias("facial-keypoints", "net4").tags["seed"] == "42"

    # Back to one seed: the other seeds' files go, and the outputs are today's again.
    reproduce(project, [42])
    assert [path.name for path in (project / "models/net4-seeds").iterdir()] == ["seeds.json"]
    assert {name: sha256(project / name) for name in one_seed} == one_seed
