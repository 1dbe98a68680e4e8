"""PNG plots of a training run (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from fusedsae import metrics as M
from fusedsae.formats import save_figure


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (the package writes PNG files, it never opens windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def count_formatter() -> Any:
    """Tick labels for counts: 950, 12k, 3.5M, 2B (matplotlib's default writes 200000 and crowds the axis)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: Any = None) -> str:
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.3g}"

    return FuncFormatter(label)


_LOSS_KEYS = ["loss", "mse_loss", "auxiliary_reconstruction_loss", "l1_loss", "l0_loss"]


def training_panels(rows: list[dict[str, Any]], activation: str | None = None) -> list[tuple[str, str, list[str]]]:
    """The panels of :func:`plot_training_curves` for a run's metrics: ``(title, y label, keys)``.

    L0 is shown only where it is learned (ReLU, JumpReLU): TopK fixes it at k and BatchTopK at k on average, so
    its panel would be a flat line. With ``activation=None`` it is shown when it varies. MMCS only for toy data."""
    present = {key for row in rows for key in row}
    panels = [
        ("loss", "loss (log scale)", [k for k in _LOSS_KEYS if k in present]),
        ("reconstruction", "FVU = 1 - explained variance", ["fvu"]),
    ]
    l0 = [row["l0"] for row in rows if "l0" in row]
    if activation is None:
        learned = bool(l0) and max(l0) - min(l0) > 1e-3 * max(1.0, abs(max(l0)))
    else:
        learned = activation in ("relu", "jumprelu")
    if learned:
        panels.append(("sparsity", "L0 (active latents per token)", ["l0"]))
    panels.append(("dead latents", "fraction of latents dead", ["dead_fraction"]))
    if "mmcs" in present:
        panels.append(("feature recovery", "MMCS with the true features", ["mmcs"]))
    return [panel for panel in panels if panel[2]]


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path, activation: str | None = None) -> Path:
    """Writes :func:`training_figure` to ``path`` (PNG)."""
    plt = pyplot()
    fig = training_figure(rows, activation)
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def training_figure(rows: list[dict[str, Any]], activation: str | None = None) -> Any:
    """Loss terms, FVU, L0 (learned-sparsity SAEs only), dead fraction and (toy data) MMCS against training tokens
    (the panels of :func:`training_panels`), as a matplotlib Figure."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    panels = training_panels(rows, activation)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0), squeeze=False)
    for ax, (title, ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                # the total on top of its terms, dashed, so that a term equal to it (MSE alone) stays visible
                style = {"color": "k", "ls": "--", "lw": 0.9, "zorder": 3} if key == "loss" and len(keys) > 1 else {}
                ax.plot(xs, ys, label=key, **({"lw": 1.2} | style))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(count_formatter())
        if title in ("loss", "reconstruction"):
            ax.set_yscale("log")
            # plain numbers (0.4, 0.6) rather than 4 x 10^-1; minor ticks are labelled only on an axis that spans
            # about a decade or less (on a wider one their labels pile up)
            plain = FuncFormatter(lambda value, _pos: f"{value:.3g}")
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if math.log10(high / low) <= 1.2 else NullFormatter())
        elif title == "dead latents":
            top = max((r.get("dead_fraction") or 0.0 for r in rows), default=0.0)
            ax.set_ylim(0.0, max(0.05, 1.1 * top))  # a fraction: never below 0; an all-zero line sits on the axis
        elif title == "feature recovery":
            ax.set_ylim(0.0, 1.02)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def plot_decoder_vs_truth(W_dec: Tensor, ground_truth: Tensor, path: str | Path, max_features: int = 64) -> Path:
    """Left: |cosine| between true features and their best-matching decoder rows (a diagonal means recovery).
    Right: histogram over true features of the best cosine with any decoder row."""
    plt = pyplot()
    cos = M.cosine_matrix(ground_truth, W_dec.detach().cpu()).cpu()
    best = cos.max(1)
    shown = min(max_features, cos.shape[0])
    match = best.indices[:shown]
    block = cos[:shown][:, match].abs()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    image = left.imshow(block.numpy(), vmin=0, vmax=1, cmap="viridis")
    left.set_title(f"first {shown} true features vs their best decoder rows", fontsize=10)
    left.set_xlabel("column j: the decoder row that best matches true feature j")
    left.set_ylabel("true feature i")
    fig.colorbar(image, ax=left, fraction=0.046).set_label("|cosine|")
    right.hist(best.values.numpy(), bins=40, range=(0, 1), color="tab:blue")
    right.axvline(float(best.values.mean()), color="k", ls="--", label=f"MMCS = {float(best.values.mean()):.3f}")
    right.set_title("best cosine of each true feature", fontsize=10)
    right.set_xlabel("max cosine with a decoder row")
    right.set_ylabel("true features")
    right.legend()
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def plot_experiment(result: Any, path: str | Path) -> Path:
    """A toy experiment (:class:`fusedsae.experiments.ExperimentResult`): per case, the MMCS of the decoder with
    each candidate basis as grouped bars, the match line, and the learned basis under each group."""
    from fusedsae.experiments import MATCH_MMCS, settings

    plt = pyplot()
    rows, bases = result.rows, result.bases
    # at most 14 inches (1540 px): eight cases of two bases made a 2100-pixel-wide image
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.8 * len(rows) * len(bases) + 2.5)), 3.8))
    width = 0.8 / len(bases)
    for j, basis in enumerate(bases):
        xs = [i + (j - (len(bases) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[f"mmcs_{basis}"] for r in rows], width, label=f"MMCS with {basis}")
    ax.axhline(MATCH_MMCS, color="k", ls="--", lw=0.8)
    labels = ["\n".join(f"{k}={v}" for k, v in settings(r).items()) + f"\n-> {r['basis']}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"MMCS (dashed: {MATCH_MMCS}, a match)", fontsize=8)
    ax.set_xlabel("case: its settings and the basis the SAE learned", fontsize=8)
    ax.set_title(f"{result.name}\n{result.question}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: never over a bar
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def results_table(metrics: dict[str, Any], keys: list[str] | None = None) -> str:
    """A plain-text two-column table of the final metrics."""
    keys = keys or [
        "l0",
        "fvu",
        "explained_variance",
        "dead_fraction",
        "mmcs",
        "tokens_per_s",
        "tokens",
        "step",
    ]
    rows = [(k, metrics[k]) for k in keys if k in metrics]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in rows:
        text = f"{value:,.0f}" if key in ("tokens_per_s", "tokens", "step") else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
