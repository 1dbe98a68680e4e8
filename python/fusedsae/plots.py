"""PNG plots of a training run (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from fusedsae import metrics as M


def _pyplot():
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


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss terms, FVU, L0, dead fraction and (toy data) MMCS against training tokens."""
    plt = _pyplot()
    panels = [
        ("loss", ["loss", "mse_loss"]),
        ("fvu", ["fvu"]),
        ("l0", ["l0"]),
        ("dead_fraction", ["dead_fraction"]),
    ]
    if any("mmcs" in r for r in rows):
        panels.append(("mmcs", ["mmcs"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    tokens = [r["tokens"] for r in rows]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(tokens, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("tokens")
        if title in ("loss", "fvu"):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_decoder_vs_truth(W_dec: Tensor, ground_truth: Tensor, path: str | Path, max_features: int = 64) -> Path:
    """Left: |cosine| between true features and their best-matching decoder rows (a diagonal means recovery).
    Right: histogram over true features of the best cosine with any decoder row."""
    plt = _pyplot()
    cos = M.cosine_matrix(ground_truth, W_dec.detach().cpu()).cpu()
    best = cos.max(1)
    shown = min(max_features, cos.shape[0])
    match = best.indices[:shown]
    block = cos[:shown][:, match].abs()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    image = left.imshow(block.numpy(), vmin=0, vmax=1, cmap="viridis")
    left.set_title(f"|cos|: first {shown} true features vs their best decoder rows")
    left.set_xlabel("decoder row (best match of true feature j)")
    left.set_ylabel("true feature")
    fig.colorbar(image, ax=left, fraction=0.046)
    right.hist(best.values.numpy(), bins=40, range=(0, 1), color="tab:blue")
    right.axvline(float(best.values.mean()), color="k", ls="--", label=f"MMCS = {float(best.values.mean()):.3f}")
    right.set_title("best cosine of each true feature")
    right.set_xlabel("max cosine with a decoder row")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_experiment(result: Any, path: str | Path) -> Path:
    """A toy experiment (:class:`fusedsae.experiments.ExperimentResult`): per case, the MMCS of the decoder with
    each candidate basis as grouped bars, the match line, and the learned basis under each group."""
    from fusedsae.experiments import MATCH_MMCS, settings

    plt = _pyplot()
    rows, bases = result.rows, result.bases
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) * len(bases) + 1.5), 3.8))
    width = 0.8 / len(bases)
    for j, basis in enumerate(bases):
        xs = [i + (j - (len(bases) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[f"mmcs_{basis}"] for r in rows], width, label=f"MMCS with {basis}")
    ax.axhline(MATCH_MMCS, color="k", ls="--", lw=0.8)
    labels = ["\n".join(f"{k}={v}" for k, v in settings(r).items()) + f"\n-> {r['basis']}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean max cosine")
    ax.set_title(f"{result.name}\n{result.question}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, for other modules' figures (the toy lab's)."""
    return _pyplot()
