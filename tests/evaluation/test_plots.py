import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from PIL import Image

from pipeline.evaluation import plots
from pipeline.evaluation.colours import BASELINE_COLOUR, NET_COLOURS, net_colour
from pipeline.faces.data import loss_to_rmse_px
from pipeline.faces.kaggle import KAGGLE_MEANS, KEYPOINTS

DPI = 80  # plots save at 80 dots per inch


def histories():
    epochs = [1, 2, 3]
    return {
        net: pd.DataFrame({"epoch": epochs, "train_loss": [0.01, 0.005, 0.003],
                           "valid_loss": [0.011, 0.006, last_valid_loss],
                           "learning_rate": [0.03, 0.015, 0.0001], "momentum": [0.9, 0.95, 0.999]})
        for net, last_valid_loss in (("net4", 0.004), ("net5", 0.0035))
    }


def size_of(path):
    with Image.open(path) as image:
        image.load()
        return image.size


def curves():
    return {
        net: pd.DataFrame({"epoch": h["epoch"], "train_rmse_px": loss_to_rmse_px(h["train_loss"]),
                           "valid_rmse_px": loss_to_rmse_px(h["valid_loss"])})
        for net, h in histories().items()
    }


@pytest.fixture
def drawn(monkeypatch):
    """The figure a drawing function saved (it saves it too), to be looked into."""
    saved, save = [], plots._save

    def keep(figure, path):
        saved.append(figure)
        save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return lambda: saved[-1]


def test_learning_curves_draw_each_nets_train_and_valid_rmse_and_the_baseline(tmp_path, drawn):
    plots.learning_curves(tmp_path / "curves" / "learning_curves.png", curves(), baseline_rmse_px=3.7)
    assert size_of(tmp_path / "curves" / "learning_curves.png") == (7 * DPI, int(4.5 * DPI))
    lines = {line.get_label(): line for line in drawn().axes[0].get_lines()}
    assert set(lines) == {"net4 train", "net4 valid", "net5 train", "net5 valid", "mean-shape baseline (test)"}
    for net, curve in curves().items():
        for kind in ("train", "valid"):
            np.testing.assert_array_equal(lines[f"{net} {kind}"].get_ydata(), curve[f"{kind}_rmse_px"])
            np.testing.assert_array_equal(lines[f"{net} {kind}"].get_xdata(), curve["epoch"])
        assert lines[f"{net} train"].get_linestyle() == "--" and lines[f"{net} valid"].get_linestyle() == "-"
    assert set(lines["mean-shape baseline (test)"].get_ydata()) == {3.7}


def test_the_log_axis_is_labelled_from_below_the_lowest_curve_to_above_the_highest(tmp_path, drawn):
    plots.learning_curves(tmp_path / "curves.png", curves(), baseline_rmse_px=3.7)
    axis = drawn().axes[0]
    ticks = axis.get_yticks()  # the curves lie between 2.63 and 5.03 px, the baseline at 3.7
    assert list(ticks) == [2, 3, 4, 5, 6]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["2", "3", "4", "5", "6"]
    low, high = axis.get_ylim()
    assert low <= ticks[0] and ticks[-1] <= high


def test_a_later_net_is_drawn_thinner_so_that_it_leaves_an_equal_curve_showing(tmp_path, drawn):
    same = curves()["net4"]
    plots.learning_curves(tmp_path / "curves.png", {"net4": same, "net5": same}, baseline_rmse_px=3.7)
    width = {line.get_label(): line.get_linewidth() for line in drawn().axes[0].get_lines()}
    assert width["net4 valid"] > 2 * width["net5 valid"] and width["net4 train"] > 2 * width["net5 train"]


@pytest.mark.parametrize("draw", [
    lambda path: plots.learning_curves(path, curves(), baseline_rmse_px=3.7),
    lambda path: plots.keypoint_errors(path, {label: {name: 1.0 for name in KEYPOINTS} for label in ("a", "b")}),
], ids=["learning_curves", "keypoint_errors"])
def test_the_legend_lies_above_the_data_under_the_title(tmp_path, drawn, draw):
    draw(tmp_path / "picture.png")
    figure = drawn()
    axis, renderer = figure.axes[0], FigureCanvasAgg(figure).get_renderer()  # the renderer savefig drew with
    legend, data, title = (artist.get_window_extent(renderer) for artist in (axis.get_legend(), axis, axis.title))
    assert legend.y0 >= data.y1 and title.y0 >= legend.y1


def test_the_same_picture_is_the_same_bytes_with_no_software_version(tmp_path):
    for name in ("first.png", "second.png"):
        plots.learning_curves(tmp_path / name, curves(), baseline_rmse_px=3.7)
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()
    with Image.open(tmp_path / "first.png") as picture:
        assert "Software" not in picture.info


def test_schedules_draw_each_nets_learning_rate_and_momentum(tmp_path, drawn):
    plots.schedules(tmp_path / "schedules.png", histories())
    assert size_of(tmp_path / "schedules.png") == (9 * DPI, int(3.5 * DPI))
    axes = drawn().axes
    assert [axis.get_title() for axis in axes] == ["learning rate", "momentum"]
    for axis, column in zip(axes, ("learning_rate", "momentum")):
        lines = {line.get_label(): line for line in axis.get_lines()}
        assert set(lines) == set(histories())
        for net, history in histories().items():
            np.testing.assert_array_equal(lines[net].get_ydata(), history[column])


def test_keypoint_errors_for_two_nets_and_the_baseline(tmp_path, drawn):
    errors = {label: {name: float(i + offset) for i, name in enumerate(KEYPOINTS)}
              for offset, label in enumerate(("net4", "net5", "baseline"))}
    plots.keypoint_errors(tmp_path / "errors.png", errors)
    width, height = size_of(tmp_path / "errors.png")
    assert width == 7 * DPI and height > 4 * DPI
    axis = drawn().axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == list(KEYPOINTS)
    bars = {container.get_label(): [bar.get_width() for bar in container] for container in axis.containers}
    assert bars == {label: [errors[label][name] for name in KEYPOINTS] for label in errors}


@pytest.mark.parametrize("nets", [("net4", "net5"), ("net4", "net5", "net6")])
def test_the_baseline_keeps_its_colour_whatever_the_number_of_nets(tmp_path, drawn, nets):
    plots.keypoint_errors(tmp_path / "errors.png", {label: {name: 1.0 for name in KEYPOINTS}
                                                    for label in (*nets, "mean-shape baseline")})
    colours = {container.get_label(): to_hex(container[0].get_facecolor()) for container in drawn().axes[0].containers}
    assert colours == {**{net: net_colour(index) for index, net in enumerate(nets)}, "mean-shape baseline": BASELINE_COLOUR}
    plots.learning_curves(tmp_path / "curves.png", curves(), baseline_rmse_px=3.7)
    lines = {line.get_label(): to_hex(line.get_color()) for line in drawn().axes[0].lines}
    assert lines["mean-shape baseline (test)"] == BASELINE_COLOUR
    assert BASELINE_COLOUR not in NET_COLOURS


def test_face_grid_with_predictions(tmp_path, drawn):
    images = np.full((5, 96, 96), 128.0)
    truth = np.tile(KAGGLE_MEANS, (5, 1))
    plots.face_grid(tmp_path / "faces.png", images, truth, "five faces", predicted=truth + 1)
    assert size_of(tmp_path / "faces.png") == (int(2.2 * 4 * DPI), int((2.2 * 2 + 0.4) * DPI))
    figure = drawn()
    assert figure.get_suptitle() == "five faces"
    shown = [axis for axis in figure.axes if axis.images]
    assert len(shown) == 5 and len(figure.axes) == 8  # two rows of four, three of them empty
    for axis in shown:
        true_points, predicted_points = (collection.get_offsets() for collection in axis.collections)
        np.testing.assert_array_equal(true_points, truth[0].reshape(15, 2))
        np.testing.assert_array_equal(predicted_points, (truth[0] + 1).reshape(15, 2))


def test_drawn_keypoints_land_on_their_pixels():
    keypoints = np.tile([10.0, 20.0], 15)  # every point on pixel (x=10, y=20)
    picture = plots.draw_keypoints(np.zeros((96, 96), dtype=np.uint8), keypoints)
    zoom = 4  # a 96-pixel face, enlarged to 384
    assert picture.size == (96 * zoom, 96 * zoom) and picture.mode == "RGB"
    assert picture.getpixel((10 * zoom + zoom // 2, 20 * zoom + zoom // 2)) == (255, 0, 0)
    assert picture.getpixel((40 * zoom, 40 * zoom)) == (0, 0, 0)


def test_a_large_image_is_drawn_at_its_own_size_with_dots_that_show():
    keypoints = np.tile([500.0, 300.0], 15)
    picture = plots.draw_keypoints(np.zeros((768, 1024), dtype=np.uint8), keypoints)
    assert picture.size == (1024, 768)
    assert picture.getpixel((500, 300)) == picture.getpixel((508, 300)) == (255, 0, 0)  # 10.7 pixels of radius
    assert picture.getpixel((520, 300)) == (0, 0, 0)


def test_a_legend_of_ten_nets_stays_within_the_picture(tmp_path, drawn):
    """With a column per net, ten nets' legend ran off both edges of keypoint_errors.png."""
    nets = [f"net{index}" for index in range(10)]
    errors = {label: {name: 2.0 + index / 10 for name in KEYPOINTS} for index, label in enumerate([*nets, "baseline"])}
    plots.keypoint_errors(tmp_path / "keypoint_errors.png", errors)
    figures = [drawn()]
    plots.learning_curves(tmp_path / "learning_curves.png", {net: curves()["net4"] for net in nets}, baseline_rmse_px=3.7)
    for figure in [*figures, drawn()]:
        renderer = figure.canvas.get_renderer()
        legend = figure.axes[0].get_legend().get_window_extent(renderer)
        title = figure.axes[0].title.get_window_extent(renderer)
        assert 0 <= legend.x0 and legend.x1 <= figure.bbox.width and legend.y1 <= figure.bbox.height
        assert title.y0 >= legend.y1 - 1  # the title above the legend, not over it


def test_a_baseline_of_no_error_is_said_in_the_legend_of_a_log_axis(tmp_path, drawn):
    """Constant keypoints (every face labelled at the centre) made the baseline 0 px: log10(0) crashed evaluate."""
    plots.learning_curves(tmp_path / "curves.png", curves(), baseline_rmse_px=0.0)
    axis = drawn().axes[0]
    assert axis.get_yscale() == "log"
    assert "mean-shape baseline (test): 0 px, no error" in [line.get_label() for line in axis.get_lines()]
    zero = curves()["net4"].assign(train_rmse_px=0.0)
    plots.learning_curves(tmp_path / "zero.png", {"net4": zero}, baseline_rmse_px=0.0)
    assert drawn().axes[0].get_yscale() == "linear"
