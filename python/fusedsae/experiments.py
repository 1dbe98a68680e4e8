"""Toy experiments: which feature bases a TopK SAE can and cannot recover (``fusedsae toy <experiment>``).

Each experiment trains a few small SAEs on toy data with known ground truth (:mod:`fusedsae.toy`) and reports, per case,
how well the decoder rows match each candidate basis (MMCS, docs/architecture.md#metrics) beside the usual metrics.
Nothing in a result is fixed in advance: the ``basis`` column is read off the measured cosines.

* ``composed`` (Anders et al. 2024): two sets of four features, one feature of each set active together. Does the
  SAE learn the 8 atomic features or the 16 combinations? It depends on the amplitudes (independent or shared) and
  on the SAE's budget (k, d_sae): with shared amplitudes the atomic basis is not identifiable (a vector can move
  between the sets' directions without changing any sample), and a k = 1 SAE learns the combinations.
* ``sparsity`` (Sharkey et al. 2022): 64 random directions in 32 dims, 3 active on average; k swept around the true
  L0. A too-small k still finds the directions but reconstructs badly; a too-large k splits and blends them.
* ``superposition`` (Elhage et al. 2022): hidden activations of trained ReLU-output toy models (20 features, 5
  dims) at rising feature sparsity. Sparser features are packed in superposition; an SAE recovers them only when
  they are sparse, not when they are dense (any rotation of dense codes reconstructs as well).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusedsae import metrics as M
from fusedsae import toy
from fusedsae.config import SAEConfig
from fusedsae.data import ToySource
from fusedsae.sae import SparseAutoencoder
from fusedsae.training import TrainConfig, Trainer

# A decoder matches a basis when its directions have decoder rows this close on average (MMCS); it has learned that
# basis rather than another when its MMCS also leads the other bases' by MARGIN.
MATCH_MMCS = 0.9
MARGIN = 0.05


@dataclass(frozen=True)
class Case:
    """One TopK SAE (``k``, ``d_sae``) trained on the toy dataset ``data()`` builds; ``settings`` are the columns
    that tell the cases apart in the results."""

    label: str
    data: Callable[[], Any]
    k: int
    d_sae: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    """Rows of measurements, one per case: the case's settings, ``mmcs_<basis>`` and ``recovered_<basis>`` (the
    fraction of that basis's directions with a decoder row at cosine > 0.9), ``basis`` (see :func:`learned_basis`),
    ``l0``, ``fvu``, ``dead_fraction`` and ``seconds``."""

    name: str
    question: str
    bases: tuple[str, ...]
    rows: list[dict[str, Any]]

    def table(self) -> str:
        """The rows as a plain-text table."""
        measured = [f"{m}_{b}" for b in self.bases for m in ("mmcs", "recovered")]
        keys = [*settings(self.rows[0]), *measured, "basis", "l0", "fvu", "dead_fraction"]
        cells = [[format_value(row[k]) for k in keys] for row in self.rows]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.name, "question": self.question, "bases": list(self.bases), "rows": self.rows}


_MEASURED = ("basis", "l0", "fvu", "dead_fraction", "seconds")


def settings(row: dict[str, Any]) -> dict[str, Any]:
    """The columns of a result row that describe its case (everything but the SAE's measurements)."""
    return {k: v for k, v in row.items() if k not in _MEASURED and not k.startswith(("mmcs_", "recovered_"))}


def learned_basis(mmcs: dict[str, float]) -> str:
    """The basis the decoder learned, read off its MMCS per basis: the best one when it reaches ``MATCH_MMCS`` and
    leads every other by ``MARGIN``; ``"mixed"`` when several reach ``MATCH_MMCS`` within the margin; else
    ``"neither"``."""
    ranked = sorted(mmcs.items(), key=lambda item: item[1], reverse=True)
    best, score = ranked[0]
    if score < MATCH_MMCS:
        return "neither"
    if len(ranked) > 1 and score - ranked[1][1] < MARGIN:
        return "mixed"
    return best


def format_value(value: Any) -> str:
    """A table cell: floats to three decimals."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Experiment:
    """A question, the bases it compares (name -> the data's unit directions ``[n, d_in]``), its cases, and
    ``describe``: columns measured on the data itself (e.g. how many features a toy model represents)."""

    question: str
    bases: dict[str, Callable[[Any], Tensor]]
    cases: Callable[[], list[Case]]
    describe: Callable[[Any], dict[str, Any]] = lambda data: {}


def _composed_cases() -> list[Case]:
    cases = []
    for correlated in (False, True):
        amplitudes = "shared" if correlated else "independent"
        for k, d_sae in ((2, 8), (1, 16), (2, 16), (2, 32)):
            cases.append(
                Case(
                    label=f"{amplitudes}-k{k}-d{d_sae}",
                    data=lambda c=correlated: toy.ComposedFeatureData(n_sets=2, set_size=4, d_in=16, correlated=c),
                    k=k,
                    d_sae=d_sae,
                    settings={"amplitudes": amplitudes, "k": k, "d_sae": d_sae},
                )
            )
    return cases


def _sparsity_cases() -> list[Case]:
    def data() -> toy.SparseFeatureData:
        return toy.SparseFeatureData(d_in=32, n_features=64, mean_active=3.0)

    return [Case(f"k{k}", data, k=k, d_sae=128, settings={"true_l0": 3.0, "k": k, "d_sae": 128}) for k in (1, 3, 6, 12)]


def _superposition_cases() -> list[Case]:
    cases = []
    for sparsity in (0.0, 0.7, 0.9, 0.97):
        # k: the expected number of active features among the 20 (at least 1, at most the 5 dims)
        k = min(5, max(1, round(20 * (1 - sparsity))))
        cases.append(
            Case(
                label=f"s{sparsity}",
                data=lambda s=sparsity: toy.SuperpositionData(n_features=20, d_hidden=5, sparsity=s),
                k=k,
                d_sae=40,
                settings={"feature_sparsity": sparsity, "k": k, "d_sae": 40},
            )
        )
    return cases


EXPERIMENTS: dict[str, Experiment] = {
    "composed": Experiment(
        question="atomic features or their combinations? (2 sets x 4 features, one per set active)",
        bases={"atomic": lambda d: d.ground_truth, "composed": lambda d: d.composed_directions},
        cases=_composed_cases,
    ),
    "sparsity": Experiment(
        question="how does recovery depend on k against the true L0? (64 directions in 32 dims, L0 = 3)",
        bases={"true": lambda d: d.ground_truth},
        cases=_sparsity_cases,
    ),
    "superposition": Experiment(
        question="can an SAE undo a toy model's superposition? (20 features in 5 dims, rising sparsity)",
        bases={"represented": lambda d: d.ground_truth},
        cases=_superposition_cases,
        describe=lambda d: {"represented": int(d.ground_truth.shape[0])},
    ),
}


def train_case(
    case: Case, steps: int, seed: int = 0, device: str = "cpu", batch_size: int = 1024
) -> tuple[Any, SparseAutoencoder, dict[str, Any]]:
    """Trains one case's TopK SAE; returns ``(data, sae, final metrics)``. Adam at 3e-3 with a linear decay over
    the last 20% of steps; a latent is dead after 50 batches without firing."""
    data = case.data()
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=data.d_in, d_sae=case.d_sae, activation="topk", k=case.k, device=device))
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        lr_decay_steps=steps // 5,
        dead_tokens=50 * batch_size,
        checkpoint_every=0,
        log_every=steps,
        seed=seed,
        progress=False,
    )
    metrics = Trainer(sae, ToySource(data, batch_size), cfg).train()
    return data, sae, metrics


def run_experiment(
    name: str,
    steps: int = 600,
    seed: int = 0,
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Runs experiment ``name`` (a key of ``EXPERIMENTS``): every case, or those whose label is in ``labels``.
    ``on_row`` is called with each row as it is measured."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; use one of {sorted(EXPERIMENTS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    experiment = EXPERIMENTS[name]
    cases = experiment.cases()
    if labels is not None:
        unknown = set(labels) - {c.label for c in cases}
        if unknown:
            raise ValueError(f"{name} has no case {sorted(unknown)}; cases: {[c.label for c in cases]}")
        cases = [c for c in cases if c.label in labels]
    rows = []
    for case in cases:
        start = time.perf_counter()
        data, sae, metrics = train_case(case, steps, seed, device)
        row: dict[str, Any] = {**case.settings, **experiment.describe(data)}
        for basis, directions in experiment.bases.items():
            cosines = M.max_cosines(directions(data).to(sae.W_dec.device), sae.W_dec)
            row[f"mmcs_{basis}"] = float(cosines.mean())
            row[f"recovered_{basis}"] = float((cosines > 0.9).float().mean())
        row["basis"] = learned_basis({b: row[f"mmcs_{b}"] for b in experiment.bases})
        row.update({k: float(metrics[k]) for k in ("l0", "fvu", "dead_fraction")})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return ExperimentResult(name, experiment.question, tuple(experiment.bases), rows)


# =================================================================================================================
# The composed-features lab (issue 12): Anders et al.'s four features in two hidden dims, many small SAEs at once
# =================================================================================================================

OBJECTIVES = ("l1", "topk", "batchtopk")


@dataclass(frozen=True)
class SAEOptions:
    """How the lab's SAEs are built and trained; one set of options per batched run.

    * ``objective``: ``"l1"`` (ReLU, loss ``mse + l1_coefficient * sum_i f_i ‖W_dec[i]‖``: SAELens's "standard"
      and Anders et al.'s), ``"topk"`` (the ``k`` largest pre-activations per sample, then ReLU) or
      ``"batchtopk"`` (the ``k * batch`` largest ReLU activations over the batch; evaluated with the same rule on
      the evaluation batch, not with a learned threshold).
    * ``apply_b_dec_to_input``: ``pre = (x - b_dec) @ W_enc + b_enc`` (SAELens default) or ``x @ W_enc + b_enc``.
    * ``normalise_mse``: each sample's squared error divided by ``‖x‖²`` (Anders et al.) instead of plain MSE.
    * ``unit_decoder``: decoder rows renormalised after every step (their gradient's radial part removed first);
      otherwise free, the L1 term weighting each activation by its row's norm.
    * Adam with ``lr`` and ``beta1`` (β₂ = 0.999), the learning rate decaying linearly to 0 over the last 20% of
      ``steps``; ``batch_size`` samples per model per step.
    * TopK/BatchTopK: AuxK with ``aux_coefficient`` for latents that have not fired for ``dead_steps`` steps;
      ``resample_dead``: such latents are also re-initialised (:func:`resample_dead`) every ``dead_steps`` steps
      until the learning rate decays — a k = 1 SAE of four latents otherwise often ends with two (AuxK alone,
      even at coefficient 1, did not revive them: their pre-activations are negative where the residual is).
    """

    objective: str = "l1"
    d_sae: int = 4
    l1_coefficient: float = 0.1
    k: int = 1
    apply_b_dec_to_input: bool = True
    normalise_mse: bool = False
    unit_decoder: bool = False
    lr: float = 1e-2
    beta1: float = 0.9
    steps: int = 2000
    batch_size: int = 512
    aux_coefficient: float = 1 / 32
    dead_steps: int = 50
    resample_dead: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.d_sae < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"d_sae, steps and batch_size must be >= 1, got {self.d_sae}, {self.steps}, {self.batch_size}"
            )
        if self.objective != "l1" and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")

    def label(self) -> str:
        """``l1`` or ``topk<k>`` / ``batchtopk<k>``: the objective as a table column."""
        return "l1" if self.objective == "l1" else f"{self.objective}{self.k}"


class BatchedSAE(torch.nn.Module):
    """``M`` independent small SAEs as one module: ``W_enc [M, d_in, d_sae]``, ``b_enc [M, d_sae]``,
    ``W_dec [M, d_sae, d_in]``, ``b_dec [M, d_in]``, trained together by one optimizer (the loss is the sum of the
    models' losses, so each model's gradient is its own). Per model: ``k [M]`` and ``l1_coefficient [M]`` (default
    the options'), and ``width [M]``: only the first ``width`` latents exist (the rest never fire), so dictionaries
    of several widths share one tensor. Model ``m`` starts from unit decoder rows drawn from ``seeds[m]`` alone,
    with ``W_enc = W_decᵀ`` and zero biases (SAELens's initialisation)."""

    def __init__(
        self,
        d_in: int,
        seeds: Sequence[int],
        options: SAEOptions,
        k: Tensor | None = None,
        l1_coefficient: Tensor | None = None,
        width: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not seeds:
            raise ValueError("a BatchedSAE needs at least one model (one seed)")
        self.options = options
        m, s = len(seeds), options.d_sae
        W = torch.stack([torch.randn(s, d_in, generator=toy.generator(seed, -7)) for seed in seeds])
        W = W / W.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W)
        self.W_enc = torch.nn.Parameter(W.transpose(1, 2).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(m, s))
        self.b_dec = torch.nn.Parameter(torch.zeros(m, d_in))
        full = torch.full((m,), 1)
        self.register_buffer("k", (full * options.k if k is None else k).long())
        l1 = full * options.l1_coefficient if l1_coefficient is None else l1_coefficient
        self.register_buffer("l1", l1.float())
        width = full * s if width is None else width
        if (width < 1).any() or (width > s).any():
            raise ValueError(f"every width must be in [1, d_sae={s}], got {width.tolist()}")
        self.register_buffer("mask", torch.arange(s) < width[:, None])

    @property
    def n_models(self) -> int:
        return self.W_dec.shape[0]

    def pre_activations(self, x: Tensor) -> Tensor:
        """``[M, N, d_sae]`` pre-activations of ``x [M, N, d_in]``; ``-inf`` at the latents beyond a model's width."""
        centred = x - self.b_dec[:, None] if self.options.apply_b_dec_to_input else x
        return (centred @ self.W_enc + self.b_enc[:, None]).masked_fill(~self.mask[:, None], float("-inf"))

    def activate(self, pre: Tensor) -> Tensor:
        """Activations ``[M, N, d_sae]`` from pre-activations: ReLU, then the objective's selection."""
        o = self.options
        acts = torch.relu(pre)
        if o.objective == "topk":
            # the k_m largest of model m: the top max(k) by torch.topk, then the first k_m of those (sorted)
            top = pre.topk(int(self.k.max()), dim=-1).indices
            keep = (torch.arange(top.shape[-1]) < self.k[:, None, None]).expand_as(top)
            acts = acts * torch.zeros_like(pre, dtype=torch.bool).scatter(-1, top, keep)
        elif o.objective == "batchtopk":
            flat = acts.detach().flatten(1)
            keep = (self.k * pre.shape[1]).clamp(max=flat.shape[1]) - 1
            cut = flat.sort(1, descending=True).values.gather(1, keep[:, None])
            acts = acts * (acts.detach() >= cut[:, :, None]) * (acts.detach() > 0)
        return acts

    def encode(self, x: Tensor) -> Tensor:
        """Activations ``[M, N, d_sae]`` of inputs ``x [M, N, d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstructions ``[M, N, d_in]`` of activations ``[M, N, d_sae]``."""
        return acts @ self.W_dec + self.b_dec[:, None]

    def losses(self, x: Tensor, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Per-model loss terms ``[M]`` on ``x [M, N, d_in]`` (``loss``, ``mse``, ``l1``: the decoder-norm weighted
        L1 whatever the objective, counted in ``loss`` for ``"l1"`` only; ``aux``) and the activations ``acts``.

        ``dead [M, d_sae]`` (TopK/BatchTopK, training): AuxK (Gao et al. 2024) — the ``d_sae // 2`` largest
        pre-activations among the dead latents reconstruct the detached residual, normalised by its variance,
        weighted by ``options.aux_coefficient``. Without it a k = 1 SAE of four latents loses most of them."""
        pre = self.pre_activations(x)
        acts = self.activate(pre)
        x_hat = self.decode(acts)
        err = (x_hat - x).pow(2).sum(-1)
        if self.options.normalise_mse:
            err = err / x.pow(2).sum(-1).clamp_min(1e-12)
        mse = err.mean(-1)
        l1 = (acts * self.W_dec.norm(dim=-1)[:, None]).sum(-1).mean(-1)
        loss = mse + self.l1 * l1 if self.options.objective == "l1" else mse
        aux = torch.zeros_like(mse)
        if dead is not None and self.options.objective != "l1" and self.options.aux_coefficient > 0:
            residual = (x - x_hat).detach()
            dead_pre = pre.masked_fill(~dead[:, None], float("-inf"))
            k_aux = max(1, self.options.d_sae // 2)
            top = dead_pre.topk(k_aux, dim=-1)
            aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values.nan_to_num(neginf=0.0)))
            aux_err = (aux_acts @ self.W_dec - residual).pow(2).sum((-1, -2))
            scale = (residual - residual.mean(1, keepdim=True)).pow(2).sum((-1, -2)).clamp_min(1e-12)
            aux = torch.where(dead.any(-1), aux_err / scale, aux)
            loss = loss + self.options.aux_coefficient * aux
        return {"loss": loss, "mse": mse, "l1": l1, "aux": aux, "acts": acts}


def train_batched(
    sae: BatchedSAE,
    batches: Callable[[int], Tensor],
    steps: int | None = None,
    lr: float | None = None,
    progress: str | None = None,
    params: Sequence[torch.nn.Parameter] | None = None,
) -> None:
    """Trains ``sae`` on ``batches(step) -> [M, B, d_in]`` (Adam, ``sae.options``' learning rate and β₁; the rate
    decays linearly to 0 over the last 20%). ``params``: the ones to train (default all). ``progress``: a tqdm bar
    with this description."""
    o = sae.options
    steps = o.steps if steps is None else steps
    lr = o.lr if lr is None else lr
    params = list(sae.parameters()) if params is None else list(params)
    opt = torch.optim.Adam(params, lr=lr, betas=(o.beta1, 0.999))
    decay_from = steps - steps // 5
    idle = torch.zeros_like(sae.mask, dtype=torch.long)  # steps since each latent last fired
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc=progress, leave=False, mininterval=1.0)
    for step in bar:
        if step >= decay_from:
            for group in opt.param_groups:
                group["lr"] = lr * (steps - step) / (steps - decay_from)
        x = batches(step)
        out = sae.losses(x, dead=idle >= o.dead_steps)
        idle = torch.where((out["acts"] > 0).any(1), 0, idle + 1)
        loss = out["loss"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.unit_decoder and sae.W_dec.grad is not None:
            with torch.no_grad():
                unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
                sae.W_dec.grad -= (sae.W_dec.grad * unit).sum(-1, keepdim=True) * unit
        opt.step()
        if o.unit_decoder:
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if o.resample_dead and step < decay_from and (step + 1) % o.dead_steps == 0:
            resample_dead(sae, x, idle >= o.dead_steps, step)
            idle = torch.where(idle >= o.dead_steps, 0, idle)


@torch.no_grad()
def resample_dead(sae: BatchedSAE, x: Tensor, dead: Tensor, step: int) -> None:
    """Bricken et al. (2023)'s resampling: each dead latent (``dead [M, d_sae]``) gets the direction of a sample of
    ``x [M, B, d_in]`` drawn with probability proportional to its squared reconstruction error, as its decoder row
    (keeping the row's norm) and, scaled by 0.2 (TopK: 1) times the mean live encoder norm, its encoder column; its
    encoder bias is reset to 0."""
    dead = dead & sae.mask
    if not dead.any():
        return
    err = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1) + 1e-12  # [M, B]
    pick = torch.multinomial(err, sae.mask.shape[1], replacement=True, generator=toy.generator(step, -8))
    new = x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1]))  # [M, d_sae, d_in]
    new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    norms = sae.W_enc.norm(dim=1)  # [M, d_sae]
    live = (~dead & sae.mask).float()
    # L1: Bricken et al.'s 0.2 (the new latent grows in on its own); TopK: the live norm itself, or the new latent
    # loses every top-k contest to the incumbents and dies again (measured: k = 1 SAEs kept 2-3 of 4 latents)
    gain = 0.2 if sae.options.objective == "l1" else 1.0
    scale = gain * ((norms * live).sum(1) / live.sum(1).clamp_min(1)).where(live.sum(1) > 0, torch.ones(()))
    sae.W_dec.copy_(torch.where(dead[..., None], new * sae.W_dec.norm(dim=-1, keepdim=True), sae.W_dec))
    sae.W_enc.copy_(torch.where(dead[:, None], new.transpose(1, 2) * scale[:, None, None], sae.W_enc))
    sae.b_enc.copy_(torch.where(dead, 0.0, sae.b_enc))


def best_encoder_losses(
    sae: BatchedSAE, dictionaries: Tensor, x: Tensor, steps: int = 300, lr: float = 1e-2, own: int | None = None
) -> dict[str, Tensor]:
    """The SAE's own loss at fixed dictionaries: for each model ``m`` and each dictionary ``dictionaries[j, m]``
    (``[J, M, d_sae, d_in]``), the encoder (``W_enc``, ``b_enc``, ``b_dec``) that minimises the loss on
    ``x [M, N, d_in]`` with the decoder held there, found by full-batch Adam from ``W_enc = Dᵀ``, zero biases.
    ``own``: the index ``j`` of ``sae``'s own decoder, whose search starts from ``sae``'s encoder and biases
    instead (TopK's selection makes the search non-convex: from the tied start it can end above the trained
    loss). Returns ``loss``, ``mse``, ``l1``, each ``[J, M]``. Whether a trained SAE reached the optimum of its
    objective is then a comparison of its loss with these."""
    j, m = dictionaries.shape[:2]
    probe = BatchedSAE(
        x.shape[-1],
        [0] * (j * m),
        sae.options,
        k=sae.k.repeat(j),
        l1_coefficient=sae.l1.repeat(j),
        width=sae.mask.sum(1).repeat(j),
    )
    with torch.no_grad():
        probe.W_dec.copy_(dictionaries.flatten(0, 1))
        probe.W_enc.copy_(probe.W_dec.transpose(1, 2) / probe.W_dec.pow(2).sum(-1)[:, None].clamp_min(1e-12))
        if own is not None:
            mine = slice(own * m, (own + 1) * m)
            probe.W_enc[mine] = sae.W_enc
            probe.b_enc[mine] = sae.b_enc
            probe.b_dec[mine] = sae.b_dec
    probe.W_dec.requires_grad_(False)
    xs = x.repeat(j, 1, 1)
    train_batched(probe, lambda step: xs, steps=steps, lr=lr, params=[probe.W_enc, probe.b_enc, probe.b_dec])
    with torch.no_grad():
        out = probe.losses(xs)
    return {key: out[key].view(j, m) for key in ("loss", "mse", "l1")}


def plus_directions(angle_degrees: Tensor) -> Tensor:
    """The "+" at each angle: ``[G, 4, 2]`` unit rows at ``angle, angle + 90, angle + 180, angle + 270``."""
    t = (angle_degrees[:, None] + torch.tensor([0.0, 90.0, 180.0, 270.0])).deg2rad()
    return torch.stack([t.cos(), t.sin()], -1)


def plus_fit(rows: Tensor) -> tuple[float, float]:
    """The "+" closest to a set of 2-d directions ``rows [n, 2]``: ``(score, angle)`` with ``angle`` in [0, 90)
    degrees maximising ``score`` = MMCS of the "+" at that angle with the rows. Basis-free: ``score = 1`` exactly
    when the rows contain two orthogonal antipodal pairs (whatever their angle), ``cos 45° ≈ 0.71`` for two
    directions only. Grid search to 0.25°, refined to 0.01°."""
    if rows.shape[0] == 0:
        return 0.0, float("nan")
    best = torch.tensor(0.0)
    for span, step in ((90.0, 0.25), (0.5, 0.01)):
        grid = best + torch.arange(-span / 2 if span < 90 else 0.0, span / 2 if span < 90 else span, step)
        plus = plus_directions(grid)
        scores = M.cosine_matrix(plus.flatten(0, 1), rows).view(len(grid), 4, -1).max(-1).values.mean(-1)
        best = grid[scores.argmax()]
    return float(scores.max()), float(best % 90.0)


def fold_angle(degrees: float) -> float:
    """An angle between two "+" shapes (period 90°) folded into [0, 45]: 0 = aligned, 45 = diagonal."""
    a = degrees % 90.0
    return min(a, 90.0 - a)


def live_latents(acts: Tensor, min_frequency: float = 1e-3) -> Tensor:
    """``[M, d_sae]`` bool: the latents that fire on at least ``min_frequency`` of the samples of
    ``acts [M, N, d_sae]``. A dead latent's decoder row says nothing about the data and is left out of the
    direction metrics."""
    return (acts > 0).float().mean(1) >= min_frequency


# -----------------------------------------------------------------------------------------------------------------
# Lab runs: cells of settings, several seeds each, one batched SAE per set of options
# -----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabConfig:
    """What every lab experiment shares. ``seeds``: SAEs per cell (each its own initialisation, all seeing the
    cell's data stream); ``steps`` and ``batch_size`` per SAE; ``eval_size`` samples for the final metrics and
    the fixed-dictionary losses (``probe_steps`` of full-batch Adam each); ``embedding``: the composed toy's hidden
    space — ``"plus"`` (idealised), ``"trained"`` (a ReLU-output toy model trained at one-hot fraction 0, kept while
    the SAE's data vary) or ``"retrained"`` (one toy model per cell, trained on the cell's data; its geometry is
    reported); ``l1_coefficient`` of the ReLU + L1 SAEs; ``lr`` of every SAE."""

    seeds: int = 8
    steps: int = 2000
    batch_size: int = 512
    eval_size: int = 2048
    probe_steps: int = 200
    embedding: str = "plus"
    l1_coefficient: float = 0.1
    lr: float = 1e-2
    toy_steps: int = 1500
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.steps < 1 or self.batch_size < 1 or self.eval_size < 1:
            raise ValueError("seeds, steps, batch_size and eval_size must be >= 1")
        if self.embedding not in ("plus", "trained", "retrained"):
            raise ValueError(f"embedding must be plus, trained or retrained, got {self.embedding!r}")

    def options(self, **changes: Any) -> SAEOptions:
        """SAE options with this config's steps, batch size, learning rate and L1 coefficient, plus ``changes``."""
        base = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "l1_coefficient": self.l1_coefficient,
        }
        return SAEOptions(**{**base, **changes})


@dataclass
class LabResult:
    """A lab experiment's measurements: ``rows`` (one per SAE), ``summary`` (one per cell: its settings, the
    number of seeds and the fraction of each outcome or the mean of each measurement), ``notes`` (analytic
    expectations and crossovers) and the columns ``keys`` that identify a cell."""

    name: str
    question: str
    keys: tuple[str, ...]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)  # trained SAEs and data, for figures

    def table(self, columns: Sequence[str] | None = None) -> str:
        """The summary as a plain-text table (``columns``: which, default all)."""
        keys = list(columns or self.summary[0].keys())
        cells = [[format_value(row.get(k, "")) for k in keys] for row in self.summary]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.name,
            "question": self.question,
            "keys": list(self.keys),
            "notes": self.notes,
            "summary": self.summary,
            "rows": self.rows,
        }

    def write(self, out: Any) -> list[Any]:
        """Writes ``<name>.json`` (everything), ``<name>_rows.csv`` and ``<name>_summary.csv`` under ``out``."""
        import csv
        import json
        from pathlib import Path

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.name}.json", out / f"{self.name}_rows.csv", out / f"{self.name}_summary.csv"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        for path, table in zip(paths[1:], (self.rows, self.summary)):
            with path.open("w", newline="") as f:
                fields = list(dict.fromkeys(k for row in table for k in row))
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(table)
        return paths


def summarise(rows: list[dict[str, Any]], keys: Sequence[str], spread: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per distinct value of ``keys`` (in first-seen order): ``n``, then for every other column the
    fraction of each value of a text column (``basis`` -> ``basis=true`` ...), the fraction of a bool column, or
    the mean of a number column (NaNs ignored); for the columns in ``spread`` also their standard deviation
    (``<column>_sd``)."""
    import math

    levels: dict[str, list[str]] = {}  # every value a text column takes anywhere, so all summaries have its columns
    for row in rows:
        for col, v in row.items():
            if isinstance(v, str) and col not in keys and v not in levels.setdefault(col, []):
                levels[col].append(v)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, Any] = {**dict(zip(keys, key)), "n": len(members)}
        for col in members[0]:
            if col in keys or col == "seed":
                continue
            values = [m[col] for m in members]
            if isinstance(values[0], bool):
                summary[col] = sum(values) / len(values)
            elif isinstance(values[0], str):
                for v in sorted(levels[col]):
                    summary[f"{col}={v}"] = values.count(v) / len(values)
            elif isinstance(values[0], (int, float)):
                finite = [float(v) for v in values if not math.isnan(float(v))]
                mean = sum(finite) / len(finite) if finite else float("nan")
                summary[col] = mean
                if col in spread:
                    summary[f"{col}_sd"] = (sum((v - mean) ** 2 for v in finite) / max(1, len(finite))) ** 0.5
        out.append(summary)
    return out


def _toy_embeddings(cells: list[dict[str, Any]], cfg: LabConfig) -> list[Tensor]:
    """The toy hidden space ``W [2, 4]`` of each cell (before its rotation), per ``cfg.embedding``."""
    if cfg.embedding == "plus":
        return [toy.plus_geometry() for _ in cells]
    if cfg.embedding == "trained":
        regimes = sorted({c["amplitudes"] == "correlated" for c in cells})
        W, _ = toy.train_composed_toy_models(
            torch.tensor(regimes), torch.zeros(len(regimes)), steps=cfg.toy_steps, seed=cfg.seed
        )
        return [W[regimes.index(c["amplitudes"] == "correlated")] for c in cells]
    corr = torch.tensor([c["amplitudes"] == "correlated" for c in cells])
    q = torch.tensor([float(c["one_hot_fraction"]) for c in cells])
    W, _ = toy.train_composed_toy_models(corr, q, steps=cfg.toy_steps, seed=cfg.seed)
    return list(W)


def run_composed(
    cells: list[dict[str, Any]], options: SAEOptions, cfg: LabConfig, desc: str = ""
) -> tuple[list[dict[str, Any]], BatchedSAE, Tensor, Tensor]:
    """Trains ``cfg.seeds`` SAEs with ``options`` on the composed toy data of each cell — a dict with
    ``amplitudes`` (``"independent"``/``"correlated"``), ``one_hot_fraction``, optional ``rotation`` (degrees) and
    ``width`` (latents, at most ``options.d_sae``) and any other columns to carry — all as one batched model, and
    measures each. Returns one row per SAE: the cell's columns, ``seed``, the toy's geometry, then

    * ``mmcs_true`` / ``mmcs_composed`` (live decoder rows against the features / the compositions), ``basis``
      (:func:`learned_basis` of the two), ``plus_score`` and ``angle`` (:func:`plus_fit`; ``angle`` folded to
      [0, 45] relative to the features' "+", ``abs_angle`` in [0, 90) relative to the first hidden axis),
      ``n_live``, ``l0``, ``fvu``;
    * ``loss``, ``mse``, ``l1`` as trained, and ``loss_refit`` / ``loss_true`` / ``loss_composed``: the loss with
      the learned / the features' / the compositions' dictionary and the best encoder for it
      (:func:`best_encoder_losses`; four-latent SAEs only); ``optimum``: which of the two hand-built dictionaries
      is lower (``"tie"`` within 1%); ``at_optimum``: the trained loss is within 1% (+1e-4) of the lower;
    * ``l1_true_analytic`` / ``l1_composed_analytic``: :func:`fusedsae.toy.expected_l1` of the idealised "+".

    Also returns the trained SAEs (model ``i * seeds + s`` is seed ``s`` of cell ``i``), their evaluation data
    ``[M, eval_size, 2]`` and each model's hidden-space embedding ``W [M, 2, 4]`` (rotated), for figures."""
    import math

    n = cfg.seeds
    embeddings = _toy_embeddings(cells, cfg)
    Ws, geometry = [], []
    for cell, W in zip(cells, embeddings):
        geometry.append(toy.embedding_geometry(W))
        Ws.append(toy.rotation(float(cell.get("rotation", 0.0))).t() @ W)
    W = torch.stack(Ws).repeat_interleave(n, 0)  # [M, 2, 4]
    corr = torch.tensor([c["amplitudes"] == "correlated" for c in cells]).repeat_interleave(n)
    q = torch.tensor([float(c["one_hot_fraction"]) for c in cells]).repeat_interleave(n)
    widths = torch.tensor([int(c.get("width", options.d_sae)) for c in cells]).repeat_interleave(n)
    seeds = [cfg.seed * 1000 + s for _ in cells for s in range(n)]

    def batches(step: int) -> Tensor:
        return toy.sample_composed(options.batch_size, corr, q, toy.generator(cfg.seed, step)) @ W.transpose(1, 2)

    sae = BatchedSAE(2, seeds, options, width=widths)
    train_batched(sae, batches, progress=desc if cfg.progress else None)
    x = toy.sample_composed(cfg.eval_size, corr, q, toy.generator(cfg.seed, -100)) @ W.transpose(1, 2)
    with torch.no_grad():
        out = sae.losses(x)
    live = live_latents(out["acts"])
    bases = [toy.composed_basis(w) for w in W]
    four = bool((widths == 4).all())
    if four:
        dictionaries = torch.stack(
            [sae.W_dec.detach(), torch.stack([b[0] for b in bases]), torch.stack([b[1] for b in bases])]
        )
        probe = best_encoder_losses(sae, dictionaries, x, steps=cfg.probe_steps, own=0)["loss"]
    rows = []
    for i, cell in enumerate(cells):
        _, feature_angle = plus_fit(bases[i * n][0])
        for s in range(n):
            m = i * n + s
            rows_m = sae.W_dec[m][live[m]].detach()
            mmcs = {
                name: float(M.mmcs(basis, rows_m)) if len(rows_m) else 0.0
                for name, basis in zip(("true", "composed"), bases[m])
            }
            score, angle = plus_fit(rows_m)
            row: dict[str, Any] = {**cell, "seed": s, **{f"toy_{k}": v for k, v in geometry[i].items()}}
            row.update(
                mmcs_true=mmcs["true"],
                mmcs_composed=mmcs["composed"],
                basis=learned_basis(mmcs),
                plus_score=score,
                angle=fold_angle(angle - feature_angle) if not math.isnan(angle) else float("nan"),
                abs_angle=angle,
                n_live=int(live[m].sum()),
                l0=float((out["acts"][m] > 0).float().sum(-1).mean()),
                fvu=float(M.fvu(x[m], sae.decode(out["acts"])[m].detach())),
                loss=float(out["loss"][m]),
                mse=float(out["mse"][m]),
                l1=float(out["l1"][m]),
            )
            if four:
                trained, refit, true, composed = float(out["loss"][m]), *(float(v) for v in probe[:, m])
                best = min(true, composed)
                row.update(loss_refit=refit, loss_true=true, loss_composed=composed)
                row["optimum"] = (
                    "tie" if abs(true - composed) <= 0.01 * best + 1e-4 else ("true" if true < composed else "composed")
                )
                row["at_optimum"] = trained <= best * 1.01 + 1e-4
            plus = geometry[i]["is_plus"] or cfg.embedding == "plus"
            corr_i = cell["amplitudes"] == "correlated"
            row["l1_true_analytic"] = (
                toy.expected_l1(0.0, corr_i, float(cell["one_hot_fraction"])) if plus else float("nan")
            )
            row["l1_composed_analytic"] = (
                toy.expected_l1(45.0, corr_i, float(cell["one_hot_fraction"])) if plus else float("nan")
            )
            rows.append(row)
    return rows, sae, x, W


def crossover(qs: Sequence[float], fractions: Sequence[float], level: float = 0.5) -> float:
    """The first ``q`` at which ``fractions`` (rising with ``qs``) reaches ``level``, linearly interpolated between
    grid points; NaN if it never does, ``qs[0]`` if it starts there."""
    for i, f in enumerate(fractions):
        if f >= level:
            if i == 0:
                return float(qs[0])
            f0, q0, q1 = fractions[i - 1], qs[i - 1], qs[i]
            return float(q0 + (level - f0) / (f - f0) * (q1 - q0))
    return float("nan")


# -----------------------------------------------------------------------------------------------------------------
# The lab's experiments
# -----------------------------------------------------------------------------------------------------------------

#: the objectives the composed-toy experiments compare, as SAE options
OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "l1": {"objective": "l1"},
    "topk1": {"objective": "topk", "k": 1},
    "topk2": {"objective": "topk", "k": 2},
}
AMPLITUDES = ("independent", "correlated")
ONEHOT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def lab_onehot(
    cfg: LabConfig,
    fractions: Sequence[float] = ONEHOT_FRACTIONS,
    objectives: Sequence[str] = ("l1", "topk1", "topk2"),
    amplitudes: Sequence[str] = AMPLITUDES,
) -> LabResult:
    """(a) The one-hot fraction sweep: for each objective, amplitude regime and fraction ``q``, which dictionary
    the SAEs learn, which one their objective prefers, and where that switches. ``notes`` holds the analytic
    crossovers (:func:`fusedsae.toy.l1_crossover`, :func:`fusedsae.toy.topk1_crossover`; TopK k = 2 reconstructs
    exactly with any "+", so it has none) beside the measured ones: ``learned`` (where half the seeds learn the
    features) and ``objective`` (where the features' dictionary, with its best encoder, first has the lower loss)."""
    rows, artifacts = [], {}
    for objective in objectives:
        cells = [
            {"objective": objective, "amplitudes": a, "one_hot_fraction": q} for a in amplitudes for q in fractions
        ]
        options = cfg.options(**OBJECTIVE_OPTIONS[objective])
        measured, sae, x, W = run_composed(cells, options, cfg, desc=f"onehot {objective}")
        rows += measured
        artifacts[objective] = (cells, sae, x, W)
    summary = summarise(rows, ("objective", "amplitudes", "one_hot_fraction"), spread=("angle",))
    notes = {"crossovers": onehot_crossovers(summary)}
    return LabResult(
        "onehot",
        "which basis does an SAE learn as the fraction q of one-hot samples grows, and does its objective predict it?",
        ("objective", "amplitudes", "one_hot_fraction"),
        rows,
        summary,
        notes,
        artifacts,
    )


def onehot_crossovers(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per objective and amplitude regime of a one-hot sweep's summary: the ``analytic`` crossover (zero bias),
    the ``objective_optimum`` one (where ``loss_composed - loss_true``, each at its best encoder, changes sign,
    linearly interpolated; NaN when the two never differ by 1e-4: a tie) and the ``learned`` one (where half the
    seeds learn the features)."""
    out = []
    for objective, amplitudes in dict.fromkeys((r["objective"], r["amplitudes"]) for r in summary):
        cell = [r for r in summary if r["objective"] == objective and r["amplitudes"] == amplitudes]
        qs = [r["one_hot_fraction"] for r in cell]
        analytic = {"l1": toy.l1_crossover, "topk1": toy.topk1_crossover}.get(objective)
        gap = [r.get("loss_composed", 0.0) - r.get("loss_true", 0.0) for r in cell]
        out.append(
            {
                "objective": objective,
                "amplitudes": amplitudes,
                "analytic": analytic(amplitudes == "correlated") if analytic else float("nan"),
                "objective_optimum": crossover(qs, gap, 0.0) if max(map(abs, gap)) > 1e-4 else float("nan"),
                "learned": crossover(qs, [r.get("basis=true", 0.0) for r in cell]),
            }
        )
    return out


ROTATIONS = (0.0, 10.0, 20.0, 30.0, 37.0, 45.0, 60.0, 75.0)


def lab_rotation(
    cfg: LabConfig,
    rotations: Sequence[float] = ROTATIONS,
    groups: Sequence[tuple[str, Sequence[float]]] = (("l1", (0.0, 0.75)), ("topk2", (0.0,))),
) -> LabResult:
    """(b) The hidden space rotated by each angle before the SAE sees it (independent amplitudes): does the
    dictionary rotate with it? ``groups``: (objective, one-hot fractions); by default ReLU + L1 at q = 0
    (compositions preferred) and q = 0.75 (features preferred), and TopK k = 2 at q = 0 (every "+" reconstructs
    exactly: nothing prefers an angle)."""
    rows, artifacts = [], {}
    for objective, fractions in groups:
        cells = [
            {"objective": objective, "amplitudes": "independent", "one_hot_fraction": q, "rotation": r}
            for q in fractions
            for r in rotations
        ]
        measured, sae, x, W = run_composed(
            cells, cfg.options(**OBJECTIVE_OPTIONS[objective]), cfg, desc=f"rotation {objective}"
        )
        rows += measured
        artifacts[objective] = (cells, sae, x, W)
    keys = ("objective", "one_hot_fraction", "rotation")
    return LabResult(
        "rotation",
        "when the hidden space is rotated, does the learned dictionary rotate with it?",
        keys,
        rows,
        summarise(rows, keys, spread=("angle",)),
        {},
        artifacts,
    )


#: the SAE options of Anders et al. against SAELens's defaults, one change at a time and all together
AUTHOR_OPTIONS: dict[str, dict[str, Any]] = {
    "standard": {},
    "normalised_mse": {"normalise_mse": True},
    "no_b_dec_input": {"apply_b_dec_to_input": False},
    "adam_beta1_0": {"beta1": 0.0},
    "authors": {"normalise_mse": True, "apply_b_dec_to_input": False, "beta1": 0.0},
}


def lab_authors(
    cfg: LabConfig,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    variants: Sequence[str] = tuple(AUTHOR_OPTIONS),
    amplitudes: Sequence[str] = AMPLITUDES,
) -> LabResult:
    """(c) ReLU + L1 SAEs with the authors' options (per-sample normalised MSE, no ``b_dec`` subtracted from the
    input, Adam β₁ = 0), each alone and all together, across one-hot fractions: which basis, and do they still
    reach the optimum of their own objective?"""
    rows, artifacts = [], {}
    for variant in variants:
        cells = [{"options": variant, "amplitudes": a, "one_hot_fraction": q} for a in amplitudes for q in fractions]
        options = cfg.options(objective="l1", **AUTHOR_OPTIONS[variant])
        measured, sae, x, W = run_composed(cells, options, cfg, desc=f"authors {variant}")
        rows += measured
        artifacts[variant] = (cells, sae, x, W)
    keys = ("options", "amplitudes", "one_hot_fraction")
    return LabResult(
        "authors",
        "with the authors' SAE options (normalised MSE, no b_dec subtraction, Adam beta1 = 0), which basis?",
        keys,
        rows,
        summarise(rows, keys, spread=("angle",)),
        {},
        artifacts,
    )


def lab_width(
    cfg: LabConfig,
    widths: Sequence[int] = (2, 3, 4, 6, 8),
    fractions: Sequence[float] = (0.0, 0.75),
    objectives: Sequence[str] = ("l1", "topk1", "topk2"),
) -> LabResult:
    """(d) Dictionary width below, at and above the four features (independent amplitudes): what a 2- or
    3-latent dictionary keeps, and what extra latents do (duplicates, or both bases at once)."""
    rows, artifacts = [], {}
    for objective in objectives:
        options = cfg.options(**OBJECTIVE_OPTIONS[objective], d_sae=max(widths))
        cells = [
            {"objective": objective, "amplitudes": "independent", "one_hot_fraction": q, "width": w}
            for q in fractions
            for w in widths
            if w >= options.k or objective == "l1"
        ]
        measured, sae, x, W = run_composed(cells, options, cfg, desc=f"width {objective}")
        rows += measured
        artifacts[objective] = (cells, sae, x, W)
    keys = ("objective", "one_hot_fraction", "width")
    return LabResult(
        "width",
        "with fewer, as many or more latents than the four features, which directions does an SAE learn?",
        keys,
        rows,
        summarise(rows, keys),
        {},
        artifacts,
    )


def run_features(
    data: Any,
    cells: list[dict[str, Any]],
    options: SAEOptions,
    cfg: LabConfig,
    measure: Callable[[Tensor, Tensor, Tensor], dict[str, Any]],
    desc: str = "",
) -> list[dict[str, Any]]:
    """Trains ``cfg.seeds`` SAEs per cell (a dict with optional ``k``, ``l1_coefficient``, ``width``) on one toy
    dataset (``data.sample(index, size)``, ``data.ground_truth``), as one batched model, all models seeing the
    same batches. Each row: the cell, ``seed``, ``mmcs_true`` and ``recovered_true`` of the live decoder rows,
    ``n_live``, ``l0``, ``fvu`` and ``measure(live_W_dec [n_live, d_in], acts [N, d_sae], x [N, d_in])``."""
    n = cfg.seeds
    rep = lambda key, default: torch.tensor([c.get(key, default) for c in cells]).repeat_interleave(n)  # noqa: E731
    sae = BatchedSAE(
        data.d_in,
        [cfg.seed * 1000 + s for _ in cells for s in range(n)],
        options,
        k=rep("k", options.k),
        l1_coefficient=rep("l1_coefficient", options.l1_coefficient).float(),
        width=rep("width", options.d_sae),
    )
    m = sae.n_models

    def batches(step: int) -> Tensor:
        return data.sample(step, options.batch_size).expand(m, -1, -1)

    train_batched(sae, batches, progress=desc if cfg.progress else None)
    x = data.sample(-100, cfg.eval_size)
    with torch.no_grad():
        acts = sae.encode(x.expand(m, -1, -1))
        x_hat = sae.decode(acts)
    live = live_latents(acts)
    rows = []
    for i, cell in enumerate(cells):
        for s in range(n):
            j = i * n + s
            W = sae.W_dec[j][live[j]].detach()
            cos = M.max_cosines(data.ground_truth, W) if len(W) else torch.zeros(len(data.ground_truth))
            row = {
                **cell,
                "seed": s,
                "mmcs_true": float(cos.mean()),
                "recovered_true": float((cos > 0.9).float().mean()),
            }
            row.update(
                n_live=int(live[j].sum()),
                l0=float((acts[j] > 0).float().sum(-1).mean()),
                fvu=float(M.fvu(x, x_hat[j])),
            )
            row.update(measure(W, acts[j][:, live[j]], x))
            rows.append(row)
    return rows


def mixing(data: toy.CorrelatedFeatureData, W: Tensor) -> dict[str, float]:
    """How much of other features the latent matched to each feature carries: over the features, the mean cosine
    of that latent with the features positively correlated with it (``C > 0.1``: ``mix_positive``) and with the
    negatively correlated ones (``C < -0.1``: ``mix_negative``); ``mix_abs``: the mean ``sin`` of the angle
    between the latent and its feature (0: pure)."""
    if len(W) == 0:
        return {"mix_positive": float("nan"), "mix_negative": float("nan"), "mix_abs": float("nan")}
    cos = M.cosine_matrix(data.ground_truth, W)  # [n, live]
    best = cos.argmax(1)
    latent_cos = cos[:, best].t()  # [n features, n features]: row i = the cosines of feature i's latent
    C = data.correlation.clone().fill_diagonal_(0.0)
    pos, neg = C > 0.1, C < -0.1
    mean_over = lambda mask: float(((latent_cos * mask).sum(1) / mask.sum(1).clamp_min(1)).mean())  # noqa: E731
    own = latent_cos.diagonal().clamp(-1, 1)
    return {
        "mix_positive": mean_over(pos),
        "mix_negative": mean_over(neg),
        "mix_abs": float((1 - own**2).sqrt().mean()),
    }


def lab_l0(
    cfg: LabConfig, ks: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10), objectives: Sequence[str] = ("topk", "batchtopk")
) -> LabResult:
    """(d) The L0 sweep on correlated features (:class:`fusedsae.toy.CorrelatedFeatureData`: 16 orthonormal
    features in 16 dims, true L0 = 4, co-firing through random factors): as k passes the true L0, do the latents
    stay pure, or mix in correlated features (Chanin et al. 2025, "Sparse but Wrong")? 16 latents."""
    data = toy.CorrelatedFeatureData(seed=cfg.seed)
    rows = []
    for objective in objectives:
        cells = [{"objective": objective, "k": k, "true_l0": round(data.true_l0, 2)} for k in ks]
        options = cfg.options(objective=objective, d_sae=data.n_features, k=1)
        rows += run_features(data, cells, options, cfg, lambda W, a, x: mixing(data, W), desc=f"l0 {objective}")
    keys = ("objective", "k", "true_l0")
    return LabResult(
        "l0",
        "as k passes the true L0 of correlated features, do latents stay pure or mix correlated features?",
        keys,
        rows,
        summarise(rows, keys),
        {"true_l0": data.true_l0, "data": data.describe()},
    )


def absorption(data: toy.HierarchicalFeatureData, W: Tensor, acts: Tensor, x: Tensor) -> dict[str, float]:
    """Feature absorption in parent/child data: ``absorption`` = mean cosine of each child's latent with its
    parent's direction (0 if pure); ``parent_recall_with_child`` / ``parent_recall_alone``: how often the parent's
    latent fires when the parent is active with a child / without one (absorption: low with a child)."""
    if len(W) == 0:
        return {
            "absorption": float("nan"),
            "parent_recall_with_child": float("nan"),
            "parent_recall_alone": float("nan"),
        }
    G = data.ground_truth
    cos = M.cosine_matrix(G, W)
    best = cos.argmax(1)
    on = (x @ G.t()) > 1e-4  # orthonormal directions: the coefficients are exact
    absorbed, with_child, alone = [], [], []
    for p in range(data.n_parents):
        fires = acts[:, best[p]] > 0
        kids = [data.child_of(p, c) for c in range(data.children)]
        absorbed += [float(cos[p, best[c]]) for c in kids]
        child_on = on[:, kids].any(1)
        with_child.append(fires[on[:, p] & child_on].float().mean())
        alone.append(fires[on[:, p] & ~child_on].float().mean())
    return {
        "absorption": sum(absorbed) / len(absorbed),
        "parent_recall_with_child": float(torch.stack(with_child).nanmean()),
        "parent_recall_alone": float(torch.stack(alone).nanmean()),
    }


def lab_hierarchy(
    cfg: LabConfig, ks: Sequence[int] = (1, 2, 3, 4, 6), l1_coefficients: Sequence[float] = (0.03, 0.1, 0.3)
) -> LabResult:
    """(d) Hierarchical features (:class:`fusedsae.toy.HierarchicalFeatureData`: 4 parents, 2 children each, a
    child only with its parent): as the sparsity pressure rises (lower k, higher L1), does the parent's latent stop
    firing when a child is active and the child's latent absorb the parent's direction? 12 latents."""
    data = toy.HierarchicalFeatureData(seed=cfg.seed)
    measure = lambda W, a, x: absorption(data, W, a, x)  # noqa: E731
    rows: list[dict[str, Any]] = []
    runs = (
        ("topk", [{"objective": "topk", "k": k} for k in ks]),
        ("l1", [{"objective": "l1", "l1_coefficient": c} for c in l1_coefficients]),
    )
    for objective, cells in runs:
        if cells:
            options = cfg.options(objective=objective, d_sae=data.n_features, k=1)
            rows += run_features(data, cells, options, cfg, measure, f"hierarchy {objective}")
    for row in rows:
        row.setdefault("k", 0)
        row.setdefault("l1_coefficient", 0.0)
    keys = ("objective", "k", "l1_coefficient")
    return LabResult(
        "hierarchy",
        "under sparsity pressure, do child latents absorb their parent's direction?",
        keys,
        rows,
        summarise(rows, keys),
        {"data": data.describe()},
    )


# Absorption (Chanin et al. 2024, "A is for Absorption"), measured on a toy with ground truth. A latent "carries" a
# feature when its unit decoder row has a cosine of at least ABSORB_COS with that feature's direction. Fixed before any
# measurement: the toy's directions are orthonormal, so a latent that learned a child alone has cosine ~0 with the
# parent, one that absorbed it 1/sqrt(2) ~ 0.71 (equal amplitudes); 0.3 sits between with room for training noise.
ABSORB_COS = 0.3


def absorption_rate(
    data: toy.HierarchicalFeatureData, W_dec: Tensor, acts: Tensor, x: Tensor, threshold: float = ABSORB_COS
) -> dict[str, float]:
    """Feature absorption of a dictionary on parent/child toy data, as Chanin et al. (2024) count it.

    For each parent p, its *main latent* is the latent whose decoder row is closest to p's direction (their
    k-sparse probe's latent, with ground truth in place of a probe). On every sample where a child of p is active
    (so p is too), the sample is *absorbed* when the main latent does not fire while another active latent carries
    p's direction (unit-row cosine >= ``threshold``): the parent's information is there, in the wrong latent.

    Args:
        data: the toy (orthonormal directions: ``n_features <= d_in``), giving ``ground_truth [n, d_in]``.
        W_dec: ``[d_sae, d_in]`` decoder rows (all latents: the metric must see dead and absorbing ones alike).
        acts: ``[N, d_sae]`` activations of ``x`` (a latent fires when its activation is > 0).
        x: ``[N, d_in]`` samples of ``data``; the active features are read off ``x @ ground_truthᵀ``.

    Returns:
        ``absorption_rate``: the mean over parents of the absorbed fraction of their child samples (0: none;
        1: every child sample absorbed); ``parent_cos``: mean cosine of each parent with its main latent (1: the
        parent has a latent of its own); ``child_parent_cos``: mean over children of the cosine between the child's
        closest latent and its parent (0: pure child latents; ~0.71: children carry the parent);
        ``parent_recall_with_child`` / ``parent_recall_alone``: how often the main latent fires when p is active
        with a child / without one.
    """
    if data.n_features > data.d_in:
        raise ValueError(
            f"absorption_rate needs orthonormal toy directions (n_features={data.n_features} <= d_in={data.d_in})"
        )
    G = data.ground_truth.to(W_dec)
    cos = M.cosine_matrix(G, W_dec)  # [n_features, d_sae]
    on = (x @ G.t()) > 1e-4  # orthonormal directions and positive amplitudes: the coefficients are exact
    fires = acts > 0
    rates, parent_cos, child_cos, with_child, alone = [], [], [], [], []
    for p in range(data.n_parents):
        main = int(cos[p].argmax())
        kids = [data.child_of(p, c) for c in range(data.children)]
        child_on = on[:, kids].any(1)
        carriers = cos[p] >= threshold
        carriers[main] = False
        absorbed = child_on & ~fires[:, main] & (fires & carriers).any(1)
        rates.append(absorbed[child_on].float().mean())
        parent_cos.append(cos[p, main])
        child_cos += [cos[p, int(cos[c].argmax())] for c in kids]
        with_child.append(fires[on[:, p] & child_on, main].float().mean())
        alone.append(fires[on[:, p] & ~child_on, main].float().mean())
    mean = lambda values: float(torch.stack(values).nanmean())  # noqa: E731 (a parent never sampled alone: NaN)
    return {
        "absorption_rate": mean(rates),
        "parent_cos": mean(parent_cos),
        "child_parent_cos": mean(child_cos),
        "parent_recall_with_child": mean(with_child),
        "parent_recall_alone": mean(alone),
    }


#: the absorption experiment's toy: 4 parents, 8 children each (a child 8x rarer than its parent), a child with
#: 70% of its parent's samples; 36 orthonormal directions in 48 dims; true L0 = 4 * 0.25 * 1.7 = 1.7 on average
ABSORPTION_TOY = {"n_parents": 4, "children": 8, "p_parent": 0.25, "p_child": 0.7, "d_in": 48}


def lab_absorption(cfg: LabConfig, cells: Sequence[tuple[str, int]] = (("topk", 2), ("batchtopk", 1))) -> LabResult:
    """Does Matryoshka stop feature absorption? (issue 13; Bussmann et al. 2025.) Plain and Matryoshka SAEs, trained
    by fusedsae's own :class:`fusedsae.Trainer` on :class:`fusedsae.toy.HierarchicalFeatureData`
    (:data:`ABSORPTION_TOY`), one latent per true feature (36), for each ``(objective, k)`` of ``cells``. The k are
    set below what the data need, the pressure that makes absorption pay: TopK k = 2 per sample (a sample with two
    parents and their children has 3-4 features), BatchTopK k = 1 on average (true L0 1.7; at k = 2 its flexible
    budget covers the data and a plain BatchTopK SAE hardly absorbs: 0.04 in a trial run). The Matryoshka SAE has
    widths ``[4, 36]``: its first 4 latents must reconstruct alone, room for the parents only. Measured per seed
    (data directions and SAE initialisation both drawn from the seed) with :func:`absorption_rate`."""
    n_features = ABSORPTION_TOY["n_parents"] * (1 + ABSORPTION_TOY["children"])
    rows: list[dict[str, Any]] = []
    runs = [(o, k, m) for o, k in cells for m in (False, True)]
    bar: Any = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs) * cfg.seeds, desc="absorption", leave=False)
    for objective, k, matryoshka in runs:
        for s in range(cfg.seeds):
            seed = cfg.seed * 1000 + s
            data = toy.HierarchicalFeatureData(**ABSORPTION_TOY, seed=seed)
            widths = [ABSORPTION_TOY["n_parents"], n_features] if matryoshka else None
            torch.manual_seed(seed)
            sae = SparseAutoencoder(
                SAEConfig(d_in=data.d_in, d_sae=n_features, activation=objective, k=k, matryoshka_widths=widths)
            )
            train = TrainConfig(
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                lr=3e-3,
                lr_decay_steps=cfg.steps // 5,
                dead_tokens=50 * cfg.batch_size,
                checkpoint_every=0,
                log_every=cfg.steps,
                seed=seed,
                progress=False,
            )
            metrics = Trainer(sae, ToySource(data, cfg.batch_size), train).train()
            x = data.sample(-100, cfg.eval_size)
            sae.eval()  # BatchTopK: its inference threshold, as the SAE would be used
            with torch.no_grad():
                acts = sae.encode(x)
                fvu = float(M.fvu(x, sae(x)))
            rows.append(
                {
                    "objective": objective,
                    "k": k,
                    "matryoshka": "[4, 36]" if matryoshka else "none",
                    "seed": s,
                    **absorption_rate(data, sae.W_dec.detach(), acts, x),
                    "l0": float((acts > 0).float().sum(-1).mean()),
                    "fvu": fvu,
                    "train_fvu": float(metrics["fvu"]),
                }
            )
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    keys = ("objective", "k", "matryoshka")
    spread = ("absorption_rate", "parent_cos", "child_parent_cos", "parent_recall_with_child", "fvu")
    return LabResult(
        "absorption",
        "do child latents absorb their parent (Chanin et al.'s rate), with and without Matryoshka prefixes?",
        keys,
        rows,
        summarise(rows, keys, spread=spread),
        {"toy": toy.HierarchicalFeatureData(**ABSORPTION_TOY).describe(), "absorb_cos": ABSORB_COS},
    )


#: one line per lab experiment, for ``fusedsae toy --help``
LAB_HELP: dict[str, str] = {
    "onehot": "(a) one-hot fraction sweep, both amplitude regimes, ReLU+L1 and TopK k=1,2, analytic crossovers",
    "rotation": "(b) the hidden space rotated: does the dictionary turn with it",
    "authors": "(c) the authors' options: normalised MSE, no b_dec subtraction, Adam beta1=0",
    "width": "(d) 2 to 8 latents for the four features",
    "l0": "(d) k against the true L0 of correlated features (Sparse but Wrong)",
    "hierarchy": "(d) parents and children: feature absorption under sparsity pressure",
    "absorption": "(e) absorption rate of plain vs Matryoshka TopK/BatchTopK SAEs on parent/child features",
}

#: the lab's experiments, by CLI name
LAB: dict[str, Callable[..., LabResult]] = {
    "onehot": lab_onehot,
    "rotation": lab_rotation,
    "authors": lab_authors,
    "width": lab_width,
    "l0": lab_l0,
    "hierarchy": lab_hierarchy,
    "absorption": lab_absorption,
}


# -----------------------------------------------------------------------------------------------------------------
# Figures
# -----------------------------------------------------------------------------------------------------------------


def _decoder_panel(ax: Any, x: Tensor, W_dec: Tensor, live: Tensor, truth: Tensor, title: str) -> None:
    """One panel: a scatter of the data ``x [N, 2]``, the features' directions (grey dashes) and the decoder rows
    of several SAEs ``W_dec [S, d_sae, 2]`` (live ones ``live [S, d_sae]``, unit length, one colour per SAE)."""
    pts = x[:600]
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.25, color="0.5", linewidths=0)
    for t in truth:
        ax.plot([0, 1.25 * float(t[0])], [0, 1.25 * float(t[1])], ls="--", color="0.3", lw=0.8)
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    for s in range(W_dec.shape[0]):
        for row in W_dec[s][live[s]]:
            u = row / row.norm().clamp_min(1e-12)
            ax.annotate(
                "",
                (float(u[0]), float(u[1])),
                (0, 0),
                arrowprops={"arrowstyle": "->", "color": colors[s % 9], "lw": 1.0, "alpha": 0.8},
            )
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _cell_panel(ax: Any, artifact: tuple, cfg_seeds: int, match: dict[str, Any], title: str) -> None:
    cells, sae, x, W = artifact
    i = next(j for j, c in enumerate(cells) if all(c.get(k) == v for k, v in match.items()))
    sl = slice(i * cfg_seeds, i * cfg_seeds + min(cfg_seeds, 4))  # four SAEs per panel stay readable
    with torch.no_grad():
        live = live_latents(sae.encode(x))[sl]
    truth = toy.composed_basis(W[i * cfg_seeds])[0]  # the cell's own (rotated, possibly trained) features
    _decoder_panel(ax, x[i * cfg_seeds], sae.W_dec.detach()[sl], live, truth, title)


def lab_figures(result: LabResult, out: Any, seeds: int) -> list[Any]:
    """The experiment's PNG figures under ``out`` (``seeds``: SAEs per cell, as run). Returns their paths."""
    from pathlib import Path

    from fusedsae.plots import pyplot

    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=80 if name == "width_decoders.png" else 100)
        plt.close(fig)
        paths.append(out / name)

    S, A = result.summary, result.artifacts
    if result.name == "onehot":
        objectives = list(dict.fromkeys(r["objective"] for r in S))
        amps = list(dict.fromkeys(r["amplitudes"] for r in S))
        fig, axes = plt.subplots(
            len(objectives), len(amps), figsize=(4.2 * len(amps), 2.8 * len(objectives)), squeeze=False
        )
        for i, obj in enumerate(objectives):
            for j, a in enumerate(amps):
                ax, cell = axes[i][j], [r for r in S if r["objective"] == obj and r["amplitudes"] == a]
                qs = [r["one_hot_fraction"] for r in cell]
                ax.plot(qs, [r.get("basis=true", 0) for r in cell], "o-", label="learned: features")
                ax.plot(qs, [r.get("basis=composed", 0) for r in cell], "s-", label="learned: compositions")
                ax.plot(
                    qs,
                    [r.get("at_optimum", float("nan")) for r in cell],
                    ":",
                    color="0.4",
                    label="at the better dictionary's loss",
                )
                prefers = [r.get("loss_composed", 0) - r.get("loss_true", 0) for r in cell]
                ax.fill_between(
                    qs,
                    0,
                    1,
                    where=[p > 1e-4 for p in prefers],
                    color="C0",
                    alpha=0.08,
                    step="mid",
                    label="objective prefers features",
                )
                note = next(n for n in result.notes["crossovers"] if n["objective"] == obj and n["amplitudes"] == a)
                if note["analytic"] == note["analytic"]:
                    ax.axvline(note["analytic"], color="k", ls="--", lw=0.9, label="analytic crossover (zero bias)")
                if note["objective_optimum"] == note["objective_optimum"]:
                    ax.axvline(note["objective_optimum"], color="C2", ls="-.", lw=0.9, label="measured (best encoders)")
                ax.set_ylim(-0.03, 1.03)
                ax.set_title(f"{obj}, {a} amplitudes", fontsize=9)
                ax.set_xlabel("one-hot fraction q", fontsize=8)
                ax.set_ylabel("fraction of seeds", fontsize=8)
        axes[0][0].legend(fontsize=6, loc="center left")
        save(fig, "onehot.png")
        if not A:  # a result read back from JSON: no SAEs to draw
            return paths
        panels = [(o, a, q) for o in objectives if o in ("l1", "topk1") for a in amps for q in (0.0, 0.75)]
        qs_run = sorted({r["one_hot_fraction"] for r in S})
        panels = [(o, a, min(qs_run, key=lambda v: abs(v - q))) for o, a, q in panels]
        cols = 2 * len(amps)
        rows_n = max(1, len(panels) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(2.4 * cols, 2.5 * rows_n), squeeze=False)
        for n, (o, a, q) in enumerate(panels):
            _cell_panel(
                axes[n // cols][n % cols], A[o], seeds, {"amplitudes": a, "one_hot_fraction": q}, f"{o}, {a}, q={q:g}"
            )
        save(fig, "onehot_decoders.png")
    elif result.name == "rotation":
        groups = list(dict.fromkeys((r["objective"], r["one_hot_fraction"]) for r in result.rows))
        fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6.6), squeeze=False)
        for j, (obj, q) in enumerate(groups):
            ax = axes[0][j]
            pts = [r for r in result.rows if r["objective"] == obj and r["one_hot_fraction"] == q]
            ax.scatter(
                [r["rotation"] for r in pts], [r["abs_angle"] for r in pts], s=10, alpha=0.6, label="learned dictionary"
            )
            rot = torch.linspace(0, 90, 91)
            ax.plot(rot, rot % 90, "k.", ms=1.5, label="features")
            ax.plot(rot, (rot + 45) % 90, ".", color="C1", ms=1.5, label="compositions")
            ax.set_xlabel("rotation of the hidden space (deg)", fontsize=8)
            ax.set_ylabel("angle of the dictionary's + (deg, mod 90)", fontsize=8)
            ax.set_title(f"{obj}, q={q:g}", fontsize=9)
            ax.set_ylim(-2, 92)
            rotations = sorted({r["rotation"] for r in pts})
            _cell_panel(
                axes[1][j],
                A[obj],
                seeds,
                {"one_hot_fraction": q, "rotation": rotations[len(rotations) // 2]},
                f"{obj}, q={q:g}, rotated {rotations[len(rotations) // 2]:g} deg",
            )
        axes[0][0].legend(fontsize=6)
        save(fig, "rotation.png")
    elif result.name == "authors":
        amps = list(dict.fromkeys(r["amplitudes"] for r in S))
        fig, axes = plt.subplots(1, len(amps), figsize=(4.6 * len(amps), 3.4), squeeze=False)
        for j, a in enumerate(amps):
            ax = axes[0][j]
            for n, variant in enumerate(dict.fromkeys(r["options"] for r in S)):
                cell = [r for r in S if r["options"] == variant and r["amplitudes"] == a]
                qs = [r["one_hot_fraction"] for r in cell]
                ax.plot(
                    qs,
                    [r.get("basis=true", 0) for r in cell],
                    "o-",
                    color=f"C{n}",
                    label=f"{variant}: learned features",
                )
                ax.plot(qs, [r.get("at_optimum", 0) for r in cell], ":", color=f"C{n}", label=f"{variant}: at optimum")
            ax.set_title(f"ReLU + L1, {a} amplitudes", fontsize=9)
            ax.set_xlabel("one-hot fraction q", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
        axes[0][-1].legend(fontsize=6, loc="center right")
        save(fig, "authors.png")
    elif result.name == "width":
        groups = list(dict.fromkeys((r["objective"], r["one_hot_fraction"]) for r in result.rows))
        groups = [g for g in groups if g[0] != "topk1"] or groups  # k = 1 SAEs lose latents: see the table
        widths = sorted({r["width"] for r in result.rows})
        fig, axes = plt.subplots(
            len(groups), len(widths), figsize=(2.1 * len(widths), 2.2 * len(groups)), squeeze=False
        )
        for i, (obj, q) in enumerate(groups):
            for j, w in enumerate(widths):
                cells = A[obj][0]
                if any(c["one_hot_fraction"] == q and c["width"] == w for c in cells):
                    _cell_panel(
                        axes[i][j], A[obj], seeds, {"one_hot_fraction": q, "width": w}, f"{obj}, q={q:g}, {w} latents"
                    )
                else:
                    axes[i][j].axis("off")
        save(fig, "width_decoders.png")
    elif result.name == "l0":
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), squeeze=False)
        for j, obj in enumerate(dict.fromkeys(r["objective"] for r in S)):
            ax, cell = axes[0][j], [r for r in S if r["objective"] == obj]
            ks = [r["k"] for r in cell]
            for col in ("mmcs_true", "mix_positive", "mix_negative", "mix_abs", "fvu"):
                ax.plot(ks, [r[col] for r in cell], "o-", label=col, ms=3)
            ax.axvline(result.notes["true_l0"], color="k", ls="--", lw=0.8, label="true L0")
            ax.set_xlabel("k", fontsize=8)
            ax.set_title(f"{obj}: 16 correlated features, 16 latents", fontsize=9)
        axes[0][0].legend(fontsize=6)
        save(fig, "l0.png")
    elif result.name == "hierarchy":
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = [
            f"{r['objective']} k={r['k']}" if r["objective"] != "l1" else f"l1 {r['l1_coefficient']:g}" for r in S
        ]
        cols = ("mmcs_true", "absorption", "parent_recall_with_child", "parent_recall_alone")
        for n, col in enumerate(cols):
            ax.bar([i + (n - 1.5) * 0.2 for i in range(len(S))], [r[col] for r in S], 0.2, label=col)
        ax.set_xticks(range(len(S)), labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="upper right")
        ax.set_title("parents and children: does the child's latent absorb the parent?", fontsize=9)
        save(fig, "hierarchy.png")
    elif result.name == "absorption":
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = [f"{r['objective']} k={r['k']}\n{'Matryoshka' if r['matryoshka'] != 'none' else 'plain'}" for r in S]
        cols = ("absorption_rate", "parent_recall_with_child", "child_parent_cos", "fvu")
        for n, col in enumerate(cols):
            xs = [i + (n - 1.5) * 0.2 for i in range(len(S))]
            ax.bar(xs, [r[col] for r in S], 0.2, yerr=[r.get(f"{col}_sd", 0.0) for r in S], label=col, capsize=2)
        ax.set_xticks(range(len(S)), labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="upper right")
        ax.set_title(f"absorption, plain vs Matryoshka (mean ± sd over {seeds} seeds)", fontsize=9)
        save(fig, "absorption.png")
    return paths


def headline_columns(result: LabResult) -> list[str]:
    """The summary columns worth printing: the cell's keys, ``n``, the outcome fractions and the main measures."""
    wanted = (
        "basis=",
        "mmcs_",
        "plus_score",
        "angle",
        "n_live",
        "fvu",
        "loss",
        "at_optimum",
        "optimum=",
        "mix_",
        "absorption",
        "parent_recall",
        "l0",
        "toy_is_plus",
    )
    first = result.summary[0]
    return [*result.keys, "n", *(k for k in first if k not in result.keys and k.startswith(wanted))]
