"""Plots a reader can use: labelled axes, token ticks in k/M, panels that mean something for the activation, a
dead-fraction axis from 0, and a per-source heatmap limited to the positions that matter."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from fusedsae import plots
from fusedsae.analysis.report import Context, plot_sources, source_positions


def _rows(l0: list[float], dead: float = 0.0, mmcs: bool = True) -> list[dict]:
    rows = []
    for i, value in enumerate(l0):
        row = {"step": 50 * (i + 1), "tokens": 51200 * (i + 1), "loss": 1.0 / (i + 1), "mse_loss": 0.9 / (i + 1)}
        row |= {"fvu": 0.5 / (i + 1), "l0": value, "dead_fraction": dead, "lr": 1e-3}
        if mmcs:
            row["mmcs"] = 0.5 + 0.01 * i
        rows.append(row)
    return rows


def test_count_ticks_read_in_k_and_m():
    label = plots.count_formatter()
    assert [label(v) for v in (950, 12_000, 200_000, 3_500_000, 2e9)] == ["950", "12k", "200k", "3.5M", "2B"]


def test_panels_follow_the_activation():
    titles = lambda rows, act: [t for t, _, _ in plots.training_panels(rows, act)]  # noqa: E731
    flat = _rows([6.0] * 8)
    learned = _rows([40.0, 30.0, 22.0, 18.0, 15.0, 14.0, 13.5, 13.0], mmcs=False)
    assert titles(flat, "topk") == ["loss", "reconstruction", "dead latents", "feature recovery"]
    assert titles(flat, "batchtopk") == titles(flat, "topk")
    assert titles(learned, "relu") == ["loss", "reconstruction", "sparsity", "dead latents"]
    assert titles(learned, "jumprelu") == titles(learned, "relu")
    # without the activation: L0 is shown when it varies
    assert "sparsity" not in titles(flat, None) and "sparsity" in titles(learned, None)
    loss_keys = plots.training_panels([{**r, "auxiliary_reconstruction_loss": 0.01} for r in flat], "topk")[0][2]
    assert loss_keys == ["loss", "mse_loss", "auxiliary_reconstruction_loss"]


def test_training_figure_axes_are_labelled_and_bounded(tmp_path):
    fig = plots.training_figure(_rows([6.0] * 8), "topk")
    try:
        for ax in fig.axes:
            assert ax.get_xlabel() == "training tokens" and ax.get_ylabel(), ax.get_title()
            ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert ticks and all(t.endswith("k") or t == "0" for t in ticks), ticks
            assert len(ticks) <= 6  # no crowded 50000100000… run of labels
        dead = next(ax for ax in fig.axes if ax.get_title() == "dead latents")
        assert dead.get_ylim()[0] == 0.0 and dead.get_ylim()[1] > 0.0
        mmcs = next(ax for ax in fig.axes if ax.get_title() == "feature recovery")
        assert mmcs.get_ylim() == pytest.approx((0.0, 1.02))
    finally:
        plots.pyplot().close(fig)
    path = plots.plot_training_curves(_rows([6.0] * 8, dead=0.3), tmp_path / "curves.png", activation="topk")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (4 * 330, 300)


def _context(n_src: int, n_heads: int = 12, position: int = 60) -> Context:
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(n_heads, n_src, generator=g) * 0.01
    sources[3, 57] = 0.8  # the positions that matter: a few large contributions
    sources[8, 12] = -0.5
    sources[5, 100] = 0.3
    tokens = [f"tok{i}" for i in range(n_src)]
    contributions = sources.sum(1).tolist()
    return Context(
        text_index=0,
        position=position,
        activation=1.0,
        constant=0.1,
        contributions=contributions,
        tokens=tokens,
        sources=sources.tolist(),
    )


def test_source_heatmap_keeps_the_positions_that_matter(tmp_path):
    ctx = _context(128)
    keep = source_positions(torch.tensor(ctx.sources), ctx.position, max_positions=24)
    assert len(keep) == 24 and keep == sorted(keep)
    assert {12, 57, 60, 100} <= set(keep)  # the large ones and the position the feature fires on
    path = plot_sources(ctx, 7, tmp_path / "sources.png")
    width = matplotlib.image.imread(path).shape[1]
    assert width <= 1200  # 128 columns used to make a 2640-pixel-wide image
    assert source_positions(torch.randn(12, 20), 5) == list(range(20))  # a short text: every position
