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


def test_every_epoch_is_linspaces_value_to_the_bit():
    for start, stop, max_epochs in ((0.03, 0.0001, 90), (0.9, 0.999, 90), (0.5, 0.5, 7), (1e-300, 5e-324, 5)):
        expected = np.linspace(start, stop, max_epochs).tolist()
        assert [linear(start, stop, max_epochs, epoch) for epoch in range(1, max_epochs + 1)] == expected


def test_an_epoch_of_a_huge_run_is_computed_alone():
    # linspace's array of 10^10 epochs would need 80 GB.
    assert linear(0.03, 0.0001, 10**10, 2) == pytest.approx(0.03 - (0.03 - 0.0001) / (10**10 - 1))
