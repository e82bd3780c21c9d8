"""The nets' colours, one per net in params.yaml's order: the same in every picture, in DVC's plot of the
nets and in MLflow's UI; and the mean-shape baseline's, one of its own."""

from __future__ import annotations

# matplotlib's default colour cycle ("tab10"), written out: the pictures and the runs' colour in MLflow
# (runs.COLOUR_TAG) then agree whatever matplotlib's settings, and the train stage that tags its run
# imports no matplotlib, nor the pictures' code, whose changes would otherwise train the nets again.
NET_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def net_colour(index: int) -> str:
    """The colour of the index-th net of params.yaml (0: net4, blue; 1: net5, orange), the one source of
    it; after ten nets the colours come round again, as matplotlib's do."""
    return NET_COLOURS[index % len(NET_COLOURS)]


# Black: none of NET_COLOURS, so the baseline keeps its colour whatever the number of nets.
BASELINE_COLOUR = "#000000"
