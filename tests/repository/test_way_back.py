"""docs/dvc.md's way back to the committed results after `dvc exp run`, in a fresh clone whose DVC
cache lacks the committed weights (they were trained elsewhere, and the project has no remote)."""

import pytest

from tests.support.project import run

pytestmark = pytest.mark.slow

TRACKED_RESULTS = ("params.yaml", "dvc.lock", "models", "metrics", "plots", "reports")
CACHED = ("models/net4.pt", "models/net5.pt", "data/prepared/train.npz", "data/synthetic/training.csv")


def test_the_way_back_trains_again_what_the_cache_lacks_and_gives_the_committed_bytes(reproduced, tmp_path):
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(reproduced), str(clone))
    run(clone, "dvc", "exp", "run", "-S", "train.max_epochs=2")
    assert run(clone, "git", "status", "--porcelain").stdout  # the experiment's results in the workspace

    run(clone, "git", "restore", *TRACKED_RESULTS)
    checkout = run(clone, "dvc", "checkout", check=False)
    assert checkout.returncode != 0 and "models/net4.pt" in checkout.stderr  # not in this clone's cache
    repro = run(clone, "dvc", "repro")
    assert "Running stage 'train@net4'" in repro.stdout and "Running stage 'synthesize'" not in repro.stdout

    assert run(clone, "git", "status", "--porcelain").stdout == ""
    for path in CACHED:
        assert (clone / path).read_bytes() == (reproduced / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(clone, "dvc", "status").stdout
