"""Spliced-in evaluation: what happens to the model when an SAE's reconstruction replaces the activation it was
trained on (issue 11).

For each SAE (a :class:`Target`: the SAE and the :class:`~fusedsae.capture.HookSpec` it reads) the model runs on
held-out text four ways, batch by batch: clean, with the SAE's reconstruction spliced in at the hook, with the hook
zeroed (zero ablation) and with it replaced by its mean over the eval tokens (mean ablation; the mean comes from a
first pass that stops at the hook). Reported, with SAELens's names where SAELens has one:

* models with a language-model head: ``ce_loss_without_sae`` (clean), ``ce_loss_with_sae``,
  ``ce_loss_with_ablation`` (zero), ``ce_loss_with_mean_ablation``; ``ce_loss_score`` =
  (CE_zero − CE_sae) / (CE_zero − CE_clean) (1: as good as the clean model, 0: as bad as zeroing the activation)
  and ``ce_loss_score_mean_ablation`` against the stricter mean-ablation baseline; ``kl_div_with_sae`` (KL of the
  spliced next-token distribution from the clean one, nats per token), ``kl_div_with_ablation``,
  ``kl_div_with_mean_ablation``, ``kl_div_score`` = (KL_zero − KL_sae) / KL_zero and ``kl_div_score_mean_ablation``.
  A causal LM's CE is next-token CE averaged over positions whose next token is real; a masked LM's is the CE of
  predicting 15% of the tokens, masked at fixed random positions (:func:`mask_for_mlm`); KL over all real positions.
* models without one (MiniLM as shipped is a sentence encoder): ``embedding_cossim_with_sae`` (mean over texts of
  the cosine between the mean-pooled sentence embedding and the clean one), ``_with_ablation`` and
  ``_with_mean_ablation``; ``embedding_score`` = (m_sae − m_zero) / (m_clean − m_zero) with m_clean = 1, and
  ``embedding_score_mean_ablation``; ``hidden_mse_with_sae`` (‖h − h_clean‖² of the final hidden states, summed
  over the width, mean over real tokens), its ablation values and ``hidden_mse_score`` = 1 − MSE_sae / MSE_zero.
* reconstruction of the held-out activations: ``explained_variance`` = 1 − ``fvu`` (Σ‖x − x̂‖² / Σ‖x − mean(x)‖²,
  :mod:`fusedsae.metrics`), ``mse`` (summed over the width, mean over tokens: fusedsae's training ``mse``; SAELens's
  eval ``mse`` is ``mse_per_element`` = mse / d_in), ``cossim`` (mean per-token cosine of x̂ and x), ``l2_ratio``
  (mean ‖x̂‖ / ‖x‖: below 1 is shrinkage), ``l0``, ``dead_fraction`` (latents that never fired on the eval tokens)
  and ``dense_fraction`` (firing on more than 10% of them), and for attention SAEs (``n_heads``)
  ``head_error_share``: each head's share of Σ‖x − x̂‖².

:func:`splice_sae` is the splice as a context manager for other uses; ``add_error=True`` adds the SAE's error
term back (x̂ + (x − x̂), the error detached: the model's output is unchanged and gradients reach the input only
through the SAE), for circuit work.

Transcoders (a :class:`Target` with ``target_hook``) read x at ``hook`` and replace y at ``target_hook`` in the same
forward pass (:func:`splice_transcoder`): the ablations zero or mean-ablate y, and the reconstruction metrics compare
ŷ with y.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedsae.capture import (
    HookSpec,
    Recorder,
    find_module,
    from_bsd,
    head_kind,
    run_recorded,
    to_bsd,
    to_tokens,
    tokenize,
)

# The batch key of a masked LM's targets (mask_for_mlm); never passed to the model.
MLM_LABELS = "mlm_labels"
# A latent firing on more than this fraction of the eval tokens is "dense" (SAEBench's and the cut-off).
DENSE_FRACTION = 0.1

SCORE_KEYS = (
    "ce_loss_score",
    "ce_loss_score_mean_ablation",
    "kl_div_score",
    "kl_div_score_mean_ablation",
    "embedding_score",
    "embedding_score_mean_ablation",
    "hidden_mse_score",
    "explained_variance",
    "cossim",
)


@dataclass(frozen=True)
class Target:
    """An SAE to evaluate: ``sae`` reconstructs the tensor named by ``hook``; ``name`` labels it in the results. A
    transcoder also has ``target_hook``: it reads ``hook`` (x) and its output replaces ``target_hook`` (y)."""

    name: str
    sae: Any
    hook: HookSpec
    target_hook: HookSpec | None = None

    @property
    def replaced(self) -> HookSpec:
        """The tensor the splice and the ablations replace: y for a transcoder, x for an SAE."""
        return self.target_hook or self.hook


# ---------------------------------------------------------------------------------------------------------------
# splicing
# ---------------------------------------------------------------------------------------------------------------


def _replace_rows(t: Tensor, hook: HookSpec, mask: Tensor | None, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``t`` (the hooked tensor, any layout :func:`~fusedsae.capture.to_bsd` reads) with its rows at the real
    positions (``mask [batch, seq]``, None: all) replaced by ``fn(rows [n, width]) -> [n, width]``."""
    if mask is None and t.dim() == 4 and hook.layout == "auto":
        raise ValueError(f"splicing a 4-D tensor at {hook.module} needs a mask or HookSpec.layout='bshd'/'bhsd'")
    seq = mask.shape[1] if mask is not None else t.shape[1]
    x = to_bsd(t, seq, hook.layout)
    if x.dim() != 3:
        raise ValueError(
            f"hooked tensor {hook.module} ({hook.io}) has shape {tuple(t.shape)}; expected [batch, seq, width]"
        )
    lo, hi = hook.columns if hook.columns is not None else (0, x.shape[-1])
    part = x[..., lo:hi]
    keep = mask.to(x.device).bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    new = part.clone()
    new[keep] = fn(part[keep]).to(part.dtype)
    if hook.columns is not None:
        new = torch.cat([x[..., :lo], new, x[..., hi:]], dim=-1)
    return from_bsd(new, t, seq, hook.layout)


@contextmanager
def splice(
    model: nn.Module, hook: HookSpec, fn: Callable[[Tensor], Tensor], mask: Tensor | None = None
) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` replaces the tensor named by ``hook`` by ``fn`` of its rows
    (``[n, width] -> [n, width]``) at the positions where ``mask [batch, seq]`` is true (None: everywhere)."""
    module = find_module(model, hook.module)
    if hook.io == "input":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if len(args) > hook.index:
                args = list(args)
                args[hook.index] = _replace_rows(args[hook.index], hook, mask, fn)
                return tuple(args), kwargs
            key = next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
            if key is None:
                raise TypeError(f"input of {hook.module}: no tensor argument to replace")
            return args, {**kwargs, key: _replace_rows(kwargs[key], hook, mask, fn)}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, Tensor):
                return _replace_rows(output, hook, mask, fn)
            if isinstance(output, tuple) and len(output) > hook.index and isinstance(output[hook.index], Tensor):
                items = list(output)
                items[hook.index] = _replace_rows(items[hook.index], hook, mask, fn)
                return type(output)(items) if type(output) is not tuple else tuple(items)
            raise TypeError(f"output of {hook.module}: expected a tensor or a tuple holding one at {hook.index}")

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def reconstruct(sae: Any, x: Tensor, add_error: bool = False) -> Tensor:
    """``sae``'s reconstruction of ``x [n, d_in]`` in ``x``'s dtype and device; with ``add_error`` the error term
    is added back, detached, so the value equals ``x`` and gradients flow through the SAE only."""
    x_hat = sae(x.to(sae.device, sae.dtype)).to(x.device, x.dtype)
    if add_error:
        return x_hat + (x - x_hat).detach()
    return x_hat


def splice_sae(model: nn.Module, hook: HookSpec, sae: Any, mask: Tensor | None = None, add_error: bool = False) -> Any:
    """:func:`splice` with ``sae``'s reconstruction (:func:`reconstruct`)."""
    return splice(model, hook, lambda x: reconstruct(sae, x, add_error), mask)


@contextmanager
def splice_pair(
    model: nn.Module,
    hook: HookSpec,
    target_hook: HookSpec,
    fn: Callable[[Tensor, Tensor], Tensor],
    mask: Tensor | None = None,
) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` keeps the rows of ``hook`` (x ``[n, d_in]``, unchanged)
    and replaces the rows of ``target_hook`` (y ``[n, d_out]``, later in the same pass) by ``fn(x, y)`` (the same
    real tokens, in the same order, as :func:`splice`'s ``mask`` selects them)."""
    held: list[Tensor] = []

    def keep(x: Tensor) -> Tensor:
        held.append(x)
        return x

    def replace(y: Tensor) -> Tensor:
        if not held:
            raise RuntimeError(
                f"{target_hook.module} ({target_hook.io}) ran before {hook.module} ({hook.io}) in the forward pass; "
                "a transcoder's input must come before its target"
            )
        return fn(held.pop(), y)

    with splice(model, hook, keep, mask), splice(model, target_hook, replace, mask):
        yield


def splice_transcoder(
    model: nn.Module, hook: HookSpec, target_hook: HookSpec, sae: Any, mask: Tensor | None = None
) -> Any:
    """:func:`splice_pair` with a transcoder: y at ``target_hook`` becomes ``sae(x)``, x read at ``hook``."""
    return splice_pair(model, hook, target_hook, lambda x, y: reconstruct(sae, x).to(y.dtype), mask)


# ---------------------------------------------------------------------------------------------------------------
# accumulators
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Reconstruction:
    """Running sums for the reconstruction metrics of one SAE (float64, on the CPU)."""

    d_sae: int
    n_heads: int | None
    tokens: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: Tensor | None = None
    cos: float = 0.0
    l2_ratio: float = 0.0
    l0: float = 0.0
    fired: Tensor | None = None
    head_sse: Tensor | None = None

    def add(self, sae: Any, x: Tensor, x_hat: Tensor, target: Tensor | None = None) -> None:
        """One batch: ``x [n, d_in]`` the SAE's input, ``x_hat`` its reconstruction of ``target`` (a transcoder's y
        ``[n, d_out]``; None: x itself)."""
        acts = sae.encode(x.to(sae.device, sae.dtype))
        x = x if target is None else target
        x64, err = x.double(), (x_hat.double() - x.double())
        firing = (acts != 0).cpu()
        self.tokens += x.shape[0]
        self.sse += float(err.pow(2).sum())
        self.sum_sq += float(x64.pow(2).sum())
        s = x64.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        norm_x, norm_hat = x64.norm(dim=-1), x_hat.double().norm(dim=-1)
        tiny = torch.finfo(torch.float64).tiny
        self.cos += float(((x64 * x_hat.double()).sum(-1) / (norm_x * norm_hat).clamp_min(tiny)).sum())
        self.l2_ratio += float((norm_hat / norm_x.clamp_min(tiny)).sum())
        self.l0 += float(firing.sum())
        counts = firing.sum(0).long()
        self.fired = counts if self.fired is None else self.fired + counts
        if self.n_heads:
            per_head = err.reshape(err.shape[0], self.n_heads, -1).pow(2).sum((0, 2)).cpu()
            self.head_sse = per_head if self.head_sse is None else self.head_sse + per_head

    def result(self) -> dict[str, Any]:
        n = max(1, self.tokens)
        assert self.sum_x is not None and self.fired is not None
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / n
        fvu = self.sse / total_var if total_var > 0 else math.nan
        out: dict[str, Any] = {
            "explained_variance": 1.0 - fvu,
            "fvu": fvu,
            "mse": self.sse / n,
            "mse_per_element": self.sse / n / self.sum_x.shape[0],
            "cossim": self.cos / n,
            "l2_ratio": self.l2_ratio / n,
            "l0": self.l0 / n,
            "dead_fraction": float((self.fired == 0).double().mean()),
            "dense_fraction": float((self.fired > DENSE_FRACTION * n).double().mean()),
        }
        if self.head_sse is not None:
            out["head_error_share"] = (self.head_sse / self.head_sse.sum().clamp_min(1e-300)).tolist()
        return out


@dataclass
class _Downstream:
    """Running sums of one run of the model (spliced or ablated) compared with the clean run."""

    ce: float = 0.0
    kl: float = 0.0
    cos: float = 0.0
    hidden_sse: float = 0.0


class _CleanRun:
    """The clean model's output on one batch, and how another run of the same batch differs from it."""

    def __init__(self, out: Tensor, inputs: dict[str, Tensor], head: str) -> None:
        self.out, self.head = out, head
        self.mask = inputs["attention_mask"].bool()
        self.ce_clean, self.n_ce = 0.0, 0
        if head == "causal":
            # position p predicts token p+1; only pairs of real tokens count (right padding)
            self.pred = torch.zeros_like(self.mask)
            self.pred[:, :-1] = self.mask[:, :-1] & self.mask[:, 1:]
            self.targets = inputs["input_ids"][:, 1:][self.pred[:, :-1]]
        elif head == "masked":
            labels = inputs[MLM_LABELS]
            self.pred = labels != -100
            self.targets = labels[self.pred]
        if head != "none":
            self.logp = F.log_softmax(out, dim=-1)
            self.ce_clean = self._ce(self.logp)
            self.n_ce = int(self.pred.sum())
        else:
            self.pooled = _mean_pool(out, self.mask)

    def _ce(self, logp: Tensor) -> float:
        return float(-logp[self.pred].gather(-1, self.targets[:, None]).sum())

    def compare(self, acc: _Downstream, out: Tensor) -> None:
        """Adds the sums of ``out`` (the same batch run spliced or ablated) to ``acc``."""
        if self.head != "none":
            logp = F.log_softmax(out, dim=-1)
            acc.ce += self._ce(logp)
            p = self.logp[self.mask]
            acc.kl += float((p.exp() * (p - logp[self.mask])).sum())
        else:
            acc.cos += float(F.cosine_similarity(_mean_pool(out, self.mask), self.pooled, dim=-1).sum())
            acc.hidden_sse += float((out - self.out)[self.mask].double().pow(2).sum())


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


# ---------------------------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics per SAE name (``metrics[name][metric]``), what they were measured on, and the model's head kind."""

    metrics: dict[str, dict[str, Any]]
    head: str
    n_tokens: int
    n_texts: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None  # JSON has no NaN
            if isinstance(v, list):
                return [clean(u) for u in v]
            return v

        return {
            "head": self.head,
            "n_tokens": self.n_tokens,
            "n_texts": self.n_texts,
            **self.info,
            "saes": {name: {k: clean(v) for k, v in m.items()} for name, m in self.metrics.items()},
        }

    def table(self) -> str:
        """The metrics as a text table: one row per metric, one column per SAE."""
        names = list(self.metrics)
        keys: list[str] = []
        for m in self.metrics.values():
            keys += [k for k in m if k not in keys and not isinstance(m[k], list)]
        width = max(len(k) for k in keys)
        cols = [max(10, len(n)) for n in names]
        lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols))]
        lines.append("-" * width + "  " + "  ".join("-" * c for c in cols))
        for k in keys:
            cells = []
            for n, c in zip(names, cols):
                v = self.metrics[n].get(k)
                cells.append(f"{'-' if v is None else format(v, '.4f'):>{c}}")
            lines.append(f"{k:<{width}}  " + "  ".join(cells))
        for n in names:
            share = self.metrics[n].get("head_error_share")
            if share:
                lines.append(f"{n} head_error_share: " + " ".join(f"h{i} {s:.2f}" for i, s in enumerate(share)))
        return "\n".join(lines)


def model_head(model: nn.Module) -> str:
    """``"causal"`` or ``"masked"`` when ``model`` has that language-model head, else ``"none"`` (evaluated through
    its final hidden states)."""
    return head_kind([type(model).__name__])


def mask_for_mlm(batches: Sequence[dict], mask_token_id: int, fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """Copies of ``batches`` for a masked LM: in each text a random ``fraction`` of the real tokens other than the
    first and the last (BERT's ``[CLS]`` and ``[SEP]``) is replaced by ``mask_token_id``, drawn from ``seed`` (the
    same positions on every run); ``batch["mlm_labels"]`` holds the original ids there and -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].bool()
        inner = mask.clone()
        inner[:, 0] = False
        inner[torch.arange(mask.shape[0]), mask.sum(1).clamp_min(1) - 1] = False
        chosen = (torch.rand(ids.shape, generator=g) < fraction) & inner
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids[chosen] = mask_token_id
        out.append({**batch, "input_ids": ids, MLM_LABELS: labels})
    return out


def _model_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in inputs.items() if k != MLM_LABELS}


def text_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Right-padded tokenised batches of ``batch_size`` texts (:func:`fusedsae.capture.tokenize`)."""
    if not texts:
        raise ValueError("no texts to evaluate on")
    return [tokenize(tokenizer, texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run(model: nn.Module, inputs: dict[str, Tensor], head: str) -> Tensor:
    out = model(**_model_inputs(inputs))
    return (out.last_hidden_state if head == "none" else out.logits).float()


def _hook_means(model: nn.Module, batches: Sequence[dict], hooks: list[HookSpec]) -> list[Tensor]:
    """Mean of each hooked tensor over the real tokens of ``batches`` (the mean-ablation value), from forward
    passes cut short once every hook has fired."""
    sums: list[Tensor | None] = [None] * len(hooks)
    count = 0
    specs = {str(i): h for i, h in enumerate(hooks)}
    for inputs in batches:
        recorder = Recorder(model, specs, stop=True)
        run_recorded(model, _model_inputs(inputs), recorder)
        mask = inputs["attention_mask"].bool()
        for i, h in enumerate(hooks):
            t = recorder.tensors[str(i)]
            rows = to_tokens(t, mask.to(t.device), h.layout, h.columns).double().sum(0)
            sums[i] = rows if sums[i] is None else sums[i] + rows
        count += int(mask.sum())
    return [s / count for s in sums]  # type: ignore[operator]


def evaluate(model: nn.Module, batches: Sequence[dict], targets: Sequence[Target]) -> EvalResult:
    """Spliced-in evaluation of ``targets`` on tokenised ``batches`` (:func:`text_batches`); see the module doc.

    ``model``: a transformers model in eval mode, with a causal LM head (``*LMHeadModel``, ``*ForCausalLM``), a
    masked one (``*ForMaskedLM``: ``batches`` from :func:`mask_for_mlm`) or none. Every forward pass runs under
    ``torch.no_grad``. Per batch: one clean pass, one spliced pass per SAE and two ablation passes per distinct hook.
    """
    if not targets:
        raise ValueError("no SAEs to evaluate")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"SAE names must differ, got {names}")
    for t in targets:
        if t.sae.training:
            t.sae.eval()
    head = model_head(model)
    if head == "masked" and not all(MLM_LABELS in b for b in batches):
        raise ValueError("a masked LM predicts masked tokens: prepare the batches with mask_for_mlm()")
    hooks: list[HookSpec] = list(dict.fromkeys(t.replaced for t in targets))
    means = _hook_means(model, batches, hooks)
    recon = {t.name: _Reconstruction(t.sae.cfg.d_sae, t.sae.cfg.n_heads) for t in targets}
    spliced = {t.name: _Downstream() for t in targets}
    zero = {h: _Downstream() for h in hooks}
    mean = {h: _Downstream() for h in hooks}
    ce_clean = 0.0
    n_ce = n_real = n_texts = 0
    device = _device_of(model)

    for inputs in batches:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        mask = inputs["attention_mask"].bool()
        with torch.no_grad():
            ref = _CleanRun(_run(model, inputs, head), inputs, head)
            ce_clean += ref.ce_clean
            n_ce += ref.n_ce
            for t in targets:

                def fn(x: Tensor, y: Tensor | None = None, t: Target = t) -> Tensor:
                    x_hat = reconstruct(t.sae, x)
                    recon[t.name].add(t.sae, x, x_hat, y)
                    return x_hat if y is None else x_hat.to(y.dtype)

                if t.target_hook is None:
                    spliced_in = splice(model, t.hook, fn, mask)
                else:
                    spliced_in = splice_pair(model, t.hook, t.target_hook, fn, mask)
                with spliced_in:
                    ref.compare(spliced[t.name], _run(model, inputs, head))
            for h, mu in zip(hooks, means):
                with splice(model, h, torch.zeros_like, mask):
                    ref.compare(zero[h], _run(model, inputs, head))
                with splice(model, h, lambda x, mu=mu: mu.to(x.device, x.dtype).expand_as(x), mask):
                    ref.compare(mean[h], _run(model, inputs, head))
        n_real += int(mask.sum())
        n_texts += int(mask.shape[0])

    metrics: dict[str, dict[str, Any]] = {}
    for t in targets:
        s, z, m = spliced[t.name], zero[t.replaced], mean[t.replaced]
        row: dict[str, Any] = {}
        if head != "none":
            clean_ce = ce_clean / max(1, n_ce)
            ce = {k: a.ce / max(1, n_ce) for k, a in (("sae", s), ("zero", z), ("mean", m))}
            kl = {k: a.kl / max(1, n_real) for k, a in (("sae", s), ("zero", z), ("mean", m))}
            row.update(
                ce_loss_score=_ratio(ce["zero"] - ce["sae"], ce["zero"] - clean_ce),
                ce_loss_score_mean_ablation=_ratio(ce["mean"] - ce["sae"], ce["mean"] - clean_ce),
                kl_div_score=_ratio(kl["zero"] - kl["sae"], kl["zero"]),
                kl_div_score_mean_ablation=_ratio(kl["mean"] - kl["sae"], kl["mean"]),
                ce_loss_without_sae=clean_ce,
                ce_loss_with_sae=ce["sae"],
                ce_loss_with_ablation=ce["zero"],
                ce_loss_with_mean_ablation=ce["mean"],
                kl_div_with_sae=kl["sae"],
                kl_div_with_ablation=kl["zero"],
                kl_div_with_mean_ablation=kl["mean"],
            )
        else:
            cos = {k: a.cos / max(1, n_texts) for k, a in (("sae", s), ("zero", z), ("mean", m))}
            mse = {k: a.hidden_sse / max(1, n_real) for k, a in (("sae", s), ("zero", z), ("mean", m))}
            row.update(
                embedding_score=_ratio(cos["sae"] - cos["zero"], 1.0 - cos["zero"]),
                embedding_score_mean_ablation=_ratio(cos["sae"] - cos["mean"], 1.0 - cos["mean"]),
                embedding_cossim_with_sae=cos["sae"],
                embedding_cossim_with_ablation=cos["zero"],
                embedding_cossim_with_mean_ablation=cos["mean"],
                hidden_mse_score=_ratio(mse["zero"] - mse["sae"], mse["zero"]),
                hidden_mse_score_mean_ablation=_ratio(mse["mean"] - mse["sae"], mse["mean"]),
                hidden_mse_with_sae=mse["sae"],
                hidden_mse_with_ablation=mse["zero"],
                hidden_mse_with_mean_ablation=mse["mean"],
            )
        row.update(recon[t.name].result())
        metrics[t.name] = row
    info: dict[str, Any] = {"hooks": {t.name: t.hook.to_dict() for t in targets}}
    if any(t.target_hook is not None for t in targets):
        info["target_hooks"] = {t.name: t.target_hook.to_dict() for t in targets if t.target_hook is not None}
    return EvalResult(metrics, head, n_real, n_texts, info)


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [batch, seq, d]`` over the real positions (``mask [batch, seq]``): ``[batch, d]`` — the
    sentence embedding of sentence-transformers models such as all-MiniLM-L6-v2 (before their normalisation,
    which a cosine ignores)."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def plot(result: EvalResult, path: str | Path) -> Path:
    """A bar chart of the scores (1 = the clean model, 0 = the ablation) and explained variance, per SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SCORE_KEYS if any(m.get(k) is not None for m in result.metrics.values())]
    names = list(result.metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(names)) / 2), 4.0))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [result.metrics[name].get(k) for k in keys]
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("score (1 = clean model)")
    ax.set_title(f"spliced-in evaluation on {result.n_tokens:,} held-out tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recorded_source(sae: Any) -> dict[str, Any]:
    """What an SAE's metadata says about its training data: ``{"model", "hook" (a HookSpec dict), "text", ...}``,
    from the cache manifest its ``dataset_path`` names (when it still exists) and the keys the trainer records
    (``model_name``, ``hook_spec``)."""
    meta = dict(getattr(sae.cfg, "metadata", {}) or {})
    out: dict[str, Any] = {}
    data = meta.get("dataset_path")
    if isinstance(data, str) and (Path(data) / "manifest.json").is_file():
        from fusedsae.cache import ActivationCache, CacheError

        with contextlib.suppress(CacheError):  # a damaged cache says nothing reliable; the metadata may still
            out.update(ActivationCache(data, allow_incomplete=True).source)
    if isinstance(meta.get("hook_spec"), dict):
        out["hook"] = meta["hook_spec"]
    if isinstance(meta.get("target_hook_spec"), dict):  # a transcoder's y
        out["target_hook"] = meta["target_hook_spec"]
    if isinstance(meta.get("model_name"), str):
        out.setdefault("model", meta["model_name"])
    for key in ("text", "split", "heldout_fraction"):
        if key in meta:
            out.setdefault(key, meta[key])
    return out


# ---------------------------------------------------------------------------------------------------------------
# during training
# ---------------------------------------------------------------------------------------------------------------

EVAL_FILE = "eval.jsonl"


class PeriodicEval:
    """A :class:`~fusedsae.training.Trainer` callback that evaluates the SAE being trained, spliced into ``model``
    on held-out ``batches``, every ``every`` steps (at the first log step at or after each multiple, and at the
    last step), and appends ``{"step", "tokens", <metrics>}`` to ``<run_dir>/eval.jsonl``.

    Lines after the trainer's current step are dropped when it is created, so a resumed run's file matches an
    uninterrupted one. The evaluation reads the SAE only, so it does not change the training.
    """

    def __init__(
        self,
        trainer: Any,
        model: nn.Module,
        batches: Sequence[dict],
        hook: HookSpec,
        every: int,
        target_hook: HookSpec | None = None,
    ) -> None:
        import json

        if every < 1:
            raise ValueError(f"eval every must be >= 1 step, got {every}")
        self.trainer, self.model, self.batches, self.hook, self.every = trainer, model, batches, hook, every
        self.target_hook = target_hook  # a transcoder's y
        self.next = (trainer.step // every + 1) * every
        self.results: list[dict[str, Any]] = []
        run_dir = trainer.run_dir
        self.path = None if run_dir is None else Path(run_dir) / EVAL_FILE
        if self.path is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= trainer.step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, metrics: dict[str, Any]) -> None:
        import json

        step = int(metrics["step"])
        last = step == self.trainer.cfg.total_steps(self.trainer.world_size)
        if step < self.next and not last:
            return
        self.next = (step // self.every + 1) * self.every
        target = Target("sae", self.trainer.inference_sae(), self.hook, self.target_hook)
        result = evaluate(self.model, self.batches, [target])
        row = {"step": step, "tokens": int(metrics["tokens"]), "eval_tokens": result.n_tokens}
        row.update(EvalResult(result.metrics, result.head, 0, 0).to_dict()["saes"]["sae"])
        self.results.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
