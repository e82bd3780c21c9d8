import numpy as np
import pytest

from pipeline.training.schedule import linear


def test_first_epoch_uses_start_and_last_uses_stop():
    assert linear(0.03, 0.0001, 3, 1) == 0.03
    assert linear(0.03, 0.0001, 3, 2) == pytest.approx(0.01505)
    assert linear(0.03, 0.0001, 3, 3) == 0.0001
    assert [linear(0.9, 0.999, 3, e) for e in (1, 2, 3)] == pytest.approx([0.9, 0.9495, 0.999])


def test_matches_the_seeds_linspace_over_many_epochs():
    expected = np.linspace(0.03, 0.0001, 3000)
    assert [linear(0.03, 0.0001, 3000, e) for e in (1, 1500, 3000)] == [expected[0], expected[1499], expected[2999]]


def test_single_epoch_uses_start():
    assert linear(0.5, 0.1, 1, 1) == 0.5


@pytest.mark.parametrize("epoch", [0, 4])
def test_rejects_epochs_outside_the_run(epoch):
    with pytest.raises(ValueError):
        linear(0.1, 0.2, 3, epoch)
