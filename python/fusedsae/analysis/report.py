"""Feature reports for attention SAEs (``fusedsae attribute``): for chosen features, the data-free head shares of
the decoder, and the top-activating contexts with their exact per-head and per-source-position breakdowns, as
text tables, JSON and PNG heatmaps."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fusedsae.analysis.attribution import head_contributions, source_contributions, weight_head_shares
from fusedsae.formats import save_figure

if TYPE_CHECKING:
    from fusedsae.sae import SparseAutoencoder

# Tokens of a [tokens, d_sae] dense activation block scanned at once (64 MiB of float32 at d_sae = 4096).
_SCAN_ELEMENTS = 1 << 24


@dataclass
class Scan:
    """Firing statistics and the top-activating tokens of every feature over a stream of tokens.

    Attributes:
        n_tokens: tokens scanned.
        counts: ``[d_sae]`` int64, tokens where the feature fired.
        top_values: ``[d_sae, n]`` the largest activations (-inf where fewer than n tokens fired).
        top_rows: ``[d_sae, n]`` int64, their rows in the scanned stream.
        text_index, position: ``[rows]`` int64 of every scanned row (to find its text).
    """

    n_tokens: int
    counts: Tensor
    top_values: Tensor
    top_rows: Tensor
    text_index: Tensor
    position: Tensor


@torch.no_grad()
def scan(sae: SparseAutoencoder, batches: Iterable[tuple[Tensor, Tensor, Tensor]], n_contexts: int = 5) -> Scan:
    """Scans ``(z [t, d_in], text_index [t], position [t])`` batches; keeps each feature's ``n_contexts`` largest
    activations (distinct tokens)."""
    d_sae = sae.cfg.d_sae
    counts = torch.zeros(d_sae, dtype=torch.int64)
    top_values = torch.full((d_sae, n_contexts), float("-inf"))
    top_rows = torch.zeros(d_sae, n_contexts, dtype=torch.int64)
    texts, positions = [], []
    seen = 0
    for z, text_index, position in batches:
        texts.append(text_index.long().cpu())
        positions.append(position.long().cpu())
        step = max(1, _SCAN_ELEMENTS // d_sae)
        for start in range(0, z.shape[0], step):
            block = z[start : start + step].to(sae.device)
            acts = sae.encode(block).float().cpu()
            counts += (acts != 0).sum(0)
            acts = acts.masked_fill(acts == 0, float("-inf"))
            rows = torch.arange(seen + start, seen + start + acts.shape[0]).expand(d_sae, -1)
            merged_values = torch.cat([top_values, acts.t()], dim=1)
            merged_rows = torch.cat([top_rows, rows], dim=1)
            top_values, order = torch.topk(merged_values, n_contexts, dim=1)
            top_rows = merged_rows.gather(1, order)
        seen += z.shape[0]
    return Scan(seen, counts, top_values, top_rows, torch.cat(texts), torch.cat(positions))


@dataclass
class Context:
    """One top-activating token of a feature.

    ``contributions [n_heads]`` + ``constant`` = ``activation`` exactly; ``sources [n_heads, S]`` (when the model
    was available) splits each head's contribution over the source positions of the text; ``tokens`` is the text.
    """

    text_index: int
    position: int
    activation: float
    constant: float
    contributions: list[float]
    tokens: list[str]
    sources: list[list[float]] | None = None

    def window(self, radius: int = 8) -> str:
        lo, hi = max(0, self.position - radius), min(len(self.tokens), self.position + radius + 1)
        words = [f"[[{t}]]" if i == self.position else t for i, t in enumerate(self.tokens[lo:hi], start=lo)]
        return " ".join(words)

    def top_sources(self, n: int = 3) -> list[tuple[int, int, float]]:
        """The ``n`` (head, source position, contribution) triples of largest magnitude."""
        if self.sources is None:
            return []
        grid = torch.tensor(self.sources)
        flat = grid.reshape(-1)
        order = torch.sort(flat.abs(), descending=True, stable=True).indices[:n]
        width = grid.shape[1]
        return [(int(i) // width, int(i) % width, float(flat[i])) for i in order]


@dataclass
class FeatureReport:
    feature: int
    frequency: float
    decoder_shares: list[float]
    convention: str
    contexts: list[Context] = field(default_factory=list)
    #: which weights ``decoder_shares`` come from: "decoder", or "encoder" for a transcoder (its decoder writes y)
    shares_of: str = "decoder"

    def mean_abs_shares(self) -> list[float]:
        """Mean over the contexts of each head's share of ``sum_h |c_h|``."""
        if not self.contexts:
            return []
        c = torch.tensor([ctx.contributions for ctx in self.contexts]).abs()
        return (c / c.sum(1, keepdim=True).clamp_min(1e-30)).mean(0).tolist()


@torch.no_grad()
def build_reports(
    sae: SparseAutoencoder,
    found: Scan,
    features: list[int],
    text_tokens: Callable[[int], list[int]],
    tokenizer: Any,
    convention: str = "raw",
    model: Any = None,
    hooks: Any = None,
    z_of_row: Callable[[int], Tensor] | None = None,
) -> list[FeatureReport]:
    """Per-feature reports. With ``model`` and ``hooks`` (:class:`fusedsae.capture.AttentionHooks`) each context's
    text is run again to capture z, A and v together, so the per-head and per-source figures come from one forward
    pass; otherwise ``z_of_row`` gives the stored z of a scanned row (per-head figures only)."""
    from fusedsae.capture import capture_attention

    shares_of = "encoder" if sae.cfg.is_transcoder else "decoder"
    shares = weight_head_shares(sae, shares_of)
    reports = []
    for f in features:
        report = FeatureReport(
            feature=f,
            frequency=float(found.counts[f]) / max(1, found.n_tokens),
            decoder_shares=shares[f].tolist(),
            convention=convention,
            shares_of=shares_of,
        )
        for value, row in zip(found.top_values[f].tolist(), found.top_rows[f].tolist()):
            if value == float("-inf"):
                break
            text, pos = int(found.text_index[row]), int(found.position[row])
            ids = text_tokens(text)
            sources = None
            if model is not None and hooks is not None:
                ids_t = torch.tensor([ids])
                cap = capture_attention(model, {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}, hooks)
                z = cap.z[0, pos]
                hc = head_contributions(sae, z, convention=convention, features=[f])
                src = source_contributions(
                    sae, cap.attention[0, :, pos : pos + 1], cap.values[0], hc.indices.view(1, 1), convention
                )
                sources = src[0, 0].float().cpu().tolist()
            else:
                assert z_of_row is not None, "build_reports needs a model or z_of_row"
                hc = head_contributions(sae, z_of_row(row), convention=convention, features=[f])
            report.contexts.append(
                Context(
                    text_index=text,
                    position=pos,
                    activation=float(hc.activations[0]),
                    constant=float(hc.constant[0]),
                    contributions=hc.contributions[0].float().cpu().tolist(),
                    tokens=tokenizer.convert_ids_to_tokens(ids),
                    sources=sources,
                )
            )
        reports.append(report)
    return reports


def choose_features(found: Scan, n: int) -> list[int]:
    """The ``n`` features that fired on the most tokens (ties to the lower id)."""
    order = torch.sort(found.counts, descending=True, stable=True).indices
    return [int(i) for i in order[:n] if found.counts[i] > 0]


def format_report(report: FeatureReport, n_sources: int = 3) -> str:
    """A text table: the feature's decoder head shares, then one row per context (activation, constant, the
    contribution of every head, the context) and its largest per-source terms."""
    n_heads = len(report.decoder_shares)
    ranked = sorted(range(n_heads), key=lambda h: -report.decoder_shares[h])
    lines = [
        f"feature {report.feature}: fires on {100 * report.frequency:.2f}% of tokens; {report.shares_of} head shares "
        + ", ".join(f"h{h} {report.decoder_shares[h]:.2f}" for h in ranked[:4]),
        f"  ({report.convention} convention: activation = constant + sum of the {n_heads} head contributions)",
    ]
    header = f"  {'act':>6} {'const':>6} " + " ".join(f"{'h' + str(h):>6}" for h in range(n_heads)) + "  context"
    lines.append(header)
    for ctx in report.contexts:
        cells = " ".join(f"{c:+6.2f}" for c in ctx.contributions)
        lines.append(f"  {ctx.activation:6.2f} {ctx.constant:+6.2f} {cells}  {ctx.window()}")
        tops = ctx.top_sources(n_sources)
        if tops:
            text = ", ".join(f"h{h} <- {ctx.tokens[s]!r}@{s} {v:+.2f}" for h, s, v in tops)
            lines.append(f"  {'':>6} {'':>6} top sources: {text}")
    if report.contexts:
        mean = report.mean_abs_shares()
        top = sorted(range(n_heads), key=lambda h: -mean[h])[:4]
        lines.append(
            "  mean |contribution| share over these contexts: " + ", ".join(f"h{h} {mean[h]:.2f}" for h in top)
        )
    return "\n".join(lines)


def to_json(reports: list[FeatureReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]


def plot_report(report: FeatureReport, folder: str | Path) -> list[Path]:
    """``feature_<f>_heads.png`` (contexts × heads heatmap of the contributions) and, when per-source terms exist,
    ``feature_<f>_sources.png`` (heads × source tokens of the top context)."""
    from fusedsae.plots import pyplot

    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if not report.contexts:
        return written
    n_heads = len(report.decoder_shares)
    grid = torch.tensor([ctx.contributions for ctx in report.contexts])
    bound = float(grid.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_heads, 1.2 + 0.5 * len(report.contexts)))
    image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(n_heads), [f"h{h}" for h in range(n_heads)], fontsize=7)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("top contexts (token the feature fires on)", fontsize=8)
    labels = [
        f"{ctx.tokens[ctx.position]} (act {ctx.activation:.2f} = const {ctx.constant:+.2f} + heads)"
        for ctx in report.contexts
    ]
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(grid.tolist()):
        for h, value in enumerate(row):
            # white on the dark end of the colour map, black elsewhere
            color = "w" if abs(value) > 0.6 * bound else "k"
            ax.text(h, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title(f"feature {report.feature}: per-head contributions ({report.convention}) at top contexts", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03).set_label("contribution to the pre-activation", fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, folder / f"feature_{report.feature}_heads.png")
    plt.close(fig)
    written.append(path)
    top = report.contexts[0]
    if top.sources is not None:
        path = folder / f"feature_{report.feature}_sources.png"
        written.append(plot_sources(top, report.feature, path))
    return written


def source_positions(sources: Tensor, position: int, max_positions: int = 24) -> list[int]:
    """The source positions worth showing for ``sources [n_heads, n_src]``: the query ``position`` and the positions
    with the largest total |contribution| over heads, at most ``max_positions``, in text order."""
    weight = sources.abs().sum(0)
    weight[position] = -1.0  # always shown; the others compete for the remaining places
    others = weight.argsort(descending=True, stable=True)[: max_positions - 1].tolist()
    return sorted({*others, position})


def plot_sources(ctx: Any, feature: int, path: str | Path, max_positions: int = 24) -> Path:
    """Heads x source positions heatmap of one context's per-source contributions, limited to the
    :func:`source_positions` that matter (a 128-token text as 128 columns is unreadable); the title says how much
    the positions left out add up to."""
    from fusedsae.plots import pyplot

    plt = pyplot()
    src = torch.tensor(ctx.sources)
    n_heads, n_src = src.shape
    keep = source_positions(src, ctx.position, max_positions)
    shown = src[:, keep]
    rest = float(src.abs().sum() - shown.abs().sum())
    bound = float(shown.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(2.2 + 0.34 * len(keep), 1.6 + 0.26 * n_heads))
    image = ax.imshow(shown.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_yticks(range(n_heads), [f"h{h}" for h in range(n_heads)], fontsize=7)
    labels = [f"{ctx.tokens[s]}  @{s}" for s in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    ax.get_xticklabels()[keep.index(ctx.position)].set_fontweight("bold")
    ax.set_xlabel("source token @ position (bold: the token the feature fires on)", fontsize=8)
    ax.set_ylabel("head", fontsize=8)
    if len(keep) < n_src:
        which = (
            f"the {len(keep)} of {n_src} positions with the largest total |contribution|; the other "
            f"{n_src - len(keep)} add {rest:.2f} in |contribution|"
        )
    else:
        which = f"all {n_src} source positions"
    ax.set_title(
        f"feature {feature} at {ctx.tokens[ctx.position]!r} (position {ctx.position}): contribution of each head "
        f"via each source\n{which}",
        fontsize=8,
    )
    fig.colorbar(image, ax=ax, fraction=0.03).set_label("contribution to the pre-activation", fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def cache_reader(cache: Any, max_tokens: int | None):
    """(batches, text_tokens, z_of_row) for :func:`scan` and :func:`build_reports` over a cache's shards in order,
    up to ``max_tokens`` rows. A text's tokens are read back from the cache (its shard holds the whole text)."""
    limit = cache.rows if max_tokens is None else min(cache.rows, max_tokens)
    starts = [0]
    for rows in cache.shard_rows:
        starts.append(starts[-1] + rows)

    def batches():
        for i in range(cache.n_shards):
            if starts[i] >= limit:
                return
            take = min(cache.shard_rows[i], limit - starts[i])
            meta = cache.tokens(i)[:take]
            yield cache.activations(i)[:take].float(), meta[:, 0], meta[:, 1]

    def text_tokens(text: int) -> list[int]:
        firsts = [s["first_text"] for s in cache.shards]
        i = bisect.bisect_right(firsts, text) - 1
        meta = cache.tokens(i)
        rows = meta[meta[:, 0] == text]
        return rows[rows[:, 1].argsort()][:, 2].tolist()

    def z_of_row(row: int):
        i = bisect.bisect_right(starts, row) - 1
        return cache.activations(i)[row - starts[i]].float()

    return batches(), text_tokens, z_of_row


def live_reader(model: Any, tokenizer: Any, hooks: Any, texts: list[str], max_length: int):
    """(batches, text_tokens) for :func:`scan` and :func:`build_reports`, capturing z of ``texts`` live."""
    from fusedsae.capture import iter_capture

    def batches():
        for _, _, batch in iter_capture(model, tokenizer, texts, {"z": hooks.z}, max_length=max_length):
            yield batch.acts["z"], batch.text_index, batch.position

    def text_tokens(text: int) -> list[int]:
        return tokenizer(texts[text], truncation=True, max_length=max_length)["input_ids"]

    return batches(), text_tokens
