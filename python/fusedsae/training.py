"""Trainer and TrainConfig: Adam with LR warm-up/decay, sparsity-coefficient warm-up, dead latents counted in
tokens, the metrics of :mod:`fusedsae.metrics`, a progress bar, a JSONL log, atomic checkpoints that resume
exactly, and data parallelism over ``torch.distributed``.

Divergence guard: every step checks its inputs, loss terms and gradients for NaN/Inf on the device and, when one
is found, skips the update (fused Adam's ``found_inf``: the weights and Adam's moments stay as they were), without
a host synchronisation. The trainer reads the guard's device counters only at log and checkpoint steps: a
non-finite loss in ``max_bad_steps`` consecutive steps, or a non-finite weight at any time, stops training with
:class:`TrainingDiverged` (one line: the step, the term, the last good checkpoint, what to try); isolated skipped
steps are reported with a warning. No checkpoint or SAE folder holding a non-finite value is ever written.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fusedsae import checkpoint as ckpt
from fusedsae import metrics as M
from fusedsae.checkpoint import CheckpointError, CheckpointMismatch, RunFolderError
from fusedsae.config import SPARSE_ACTIVATIONS, SAEConfig
from fusedsae.data import DataError, as_source, check_widths, split_pair
from fusedsae.formats import atomic_write, read_json, write_json
from fusedsae.sae import SparseAutoencoder, TrainingOutput
from fusedsae.sharded_files import SlicedTensor, write_sliced_safetensors
from fusedsae.sharding import LATENT_DIM, TRANSCODER_REFUSAL, ProcessGrid, ShardedAutoencoder, transcoder_kind

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_SAE_DIR = "sae"

# What the divergence guard watches, in the order of its device-side flag vector: the inputs, each loss term by its
# SAELens name ("loss" collects any other term), then the gradients.
GUARD_TERMS = ("inputs", "mse_loss", "l1_loss", "l0_loss", "auxiliary_reconstruction_loss", "loss", "gradients")
# A log whose FVU is above FVU_WARNING for FVU_WARNING_LOGS logs in a row is warned about (a finite divergence:
# --lr 10 gave FVU 9.7e10; a healthy run stays below 1).
FVU_WARNING = 1e3
FVU_WARNING_LOGS = 3
# Train-config fields that may change when a run is resumed: they do not change the weights up to the resumed
# step (bookkeeping) or follow the run's length (--steps may extend a finished run; its decay follows the new end;
# --lr sets the step size from the resumed step on, as issue 10 asks of `--resume --lr`).
RESUME_MAY_CHANGE = frozenset(
    {
        "shard_latents",  # checkpoints hold the whole dictionary
        "steps",
        "lr",
        "total_tokens",
        "lr_decay_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "run_dir",
        "progress",
        "run_id",
        "overwrite",
        "max_bad_steps",
    }
)


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss stayed non-finite or a weight became non-finite.

    Attributes: ``step`` (the trainer's step when it stopped), ``term`` (what went non-finite: one of
    :data:`GUARD_TERMS` or ``"weights"``), ``checkpoint`` (the last good checkpoint, or None).
    """

    def __init__(self, message: str, step: int, term: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.term = term
        self.checkpoint = checkpoint


class NonFiniteInputs(TrainingDiverged, ValueError):
    """The training inputs held NaN or Inf (a ValueError too: the data, not the optimisation, is at fault)."""


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimizer steps (ignored when ``total_tokens`` is set).
        total_tokens: train on this many tokens (all ranks together); sets ``steps``.
        batch_size: tokens per step on each rank.
        lr, adam_beta1, adam_beta2, adam_eps: Adam.
        lr_warm_up_steps: linear warm-up from 0; ``lr_decay_steps``: linear decay to ``lr_end`` over the last steps.
        max_grad_norm: gradient clipping (None: off). SAELens clips at 1.0.
        sparsity_warm_up_steps: the L1/L0 coefficient rises linearly from 0 over these steps.
        dead_tokens: a latent is dead after this many tokens without firing (SAELens counts 1000 steps;
            sparsify and dictionary_learning 10M tokens, our default).
        b_dec_init: "geometric_median", "mean" or "zeros" from the first batch, or "keep" (fine-tuning an SAE
            that already has its b_dec).
        sparsity_window_steps: firing frequencies for ``sparsity.safetensors`` are counted over this window.
        log_every, checkpoint_every (0: only at the end), keep_checkpoints: logging and checkpoint cadence.
        run_dir: where metrics.jsonl, checkpoints/, sae/ and summary.json go (None: nothing is written).
        seed: seeds torch's global RNG at the start of training.
        progress: show a tqdm progress bar.
        max_bad_steps: stop when this many consecutive steps had a non-finite loss or gradient (their updates are
            skipped; an isolated one is only reported).
        run_id: the run's identity (None: a fresh one for a new run, the checkpoint's when resuming).
        overwrite: a new run may replace another run's files in ``run_dir`` (otherwise it is refused).
        shard_latents: under ``torch.distributed``, this many ranks share the latents (each holds a contiguous
            slice; :mod:`fusedsae.sharding`); the world is ``shard_latents × data-parallel replicas``. 1: pure data
            parallelism. Checkpoints hold the whole dictionary, so a run resumes under another ``shard_latents``.
    """

    steps: int = 2000
    total_tokens: int | None = None
    batch_size: int = 4096
    lr: float = 4e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    lr_end: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    sparsity_warm_up_steps: int = 0
    dead_tokens: int = 10_000_000
    b_dec_init: str = "geometric_median"
    sparsity_window_steps: int = 1000
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    run_dir: str | None = None
    seed: int = 0
    progress: bool = True
    max_bad_steps: int = 10
    run_id: str | None = None
    overwrite: bool = False
    shard_latents: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros", "keep"):
            raise ValueError(f"b_dec_init must be geometric_median, mean, zeros or keep, got {self.b_dec_init!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1 and self.total_tokens is None:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shard_latents < 1:
            raise ValueError(f"shard_latents must be >= 1, got {self.shard_latents}")

    def total_steps(self, world_size: int = 1) -> int:
        if self.total_tokens is not None:
            return max(1, math.ceil(self.total_tokens / (self.batch_size * world_size)))
        return self.steps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


class Trainer:
    """Trains a :class:`SparseAutoencoder` on a data source (:mod:`fusedsae.data`).

    ``Trainer(sae, data, cfg).train()`` runs to ``cfg.total_steps()`` and returns the final metrics. With
    ``cfg.run_dir`` it logs to ``metrics.jsonl``, checkpoints to ``checkpoints/`` and writes the SAE (SAELens
    folder, input scale folded in) to ``sae/``; :meth:`resume` continues a killed run bit-for-bit on the same
    machine. Under ``torch.distributed`` every rank runs a Trainer on its own share of the data; gradients and
    firing statistics are averaged/combined across ranks and rank 0 writes the files. With
    ``cfg.shard_latents = S > 1`` each group of S ranks shares one batch and splits the latents: ``trainer.sae``
    is then this rank's :class:`~fusedsae.sharding.ShardedAutoencoder` slice and :meth:`full_sae` gathers the
    whole SAE; the data source must give the S ranks of a group the same batches (rank = ``grid.replica_rank``,
    world = ``grid.replicas``).

    ``data`` is anything :func:`fusedsae.data.as_source` takes: a data source, a ``[N, d_in]`` tensor, a toy dataset,
    any iterable of ``[n, d_in]`` tensors (a generator, a ``DataLoader``) or a ``--data`` spec string. Every step
    takes exactly ``cfg.batch_size`` rows; a source that cannot fill that is a :class:`~fusedsae.data.DataError`.

    A transcoder (``sae.cfg.d_out`` set) trains on rows ``[x | y]`` of width ``d_in + d_out`` (every source gives
    them as for an SAE, so shuffling, resuming and data parallelism are unchanged); each batch is split with
    :func:`fusedsae.data.split_pair`. ``normalize_activations="expected_average_only_in"`` then scales x and y
    each by its own factor (E‖x‖ = sqrt(d_in), E‖y‖ = sqrt(d_out)), both folded into the saved weights
    (:meth:`SparseAutoencoder.fold_activation_norm_scaling_factor`). Latent sharding refuses transcoders.

    ``callbacks``: each is called on rank 0 with every logged metrics dict (the keys and values of a
    ``metrics.jsonl`` line: ``step``, ``tokens``, ``loss``, ``fvu``, ``l0``, ``dead_fraction``…), as
    ``callback(metrics)``; one that has a ``close()`` method has it called once when :meth:`train` returns or
    raises. :mod:`fusedsae.tracking` has callbacks for Weights & Biases and TensorBoard.

    The run folder belongs to one run (``run_id``) and is locked while the trainer writes it: a new run refuses a
    folder holding another run (:class:`fusedsae.checkpoint.RunFolderError`; ``cfg.overwrite`` replaces it), and
    a resume refuses checkpoints of another run or of settings that would change the result.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        data: Any,
        cfg: TrainConfig | None = None,
        callbacks: list[Callable[[dict[str, Any]], None]] | None = None,
    ) -> None:
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        self.callbacks = list(callbacks or [])
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.grid: ProcessGrid | None = None
        if self.cfg.shard_latents > 1 and (sae.cfg.is_transcoder or sae.cfg.skip_connection):
            raise ValueError(TRANSCODER_REFUSAL.format(what=transcoder_kind(sae.cfg)))
        if self.cfg.shard_latents > 1 or isinstance(sae, ShardedAutoencoder):
            self.grid = sae.grid if isinstance(sae, ShardedAutoencoder) else ProcessGrid(self.cfg.shard_latents)
            if not isinstance(sae, ShardedAutoencoder):
                sae = ShardedAutoencoder.from_full(sae, self.grid)
            self.sae = sae
        if self.grid is not None:  # a rank started with other settings would train another model, or hang
            train = {k: v for k, v in asdict(self.cfg).items() if k != "run_id"}  # rank 0's id names the run
            settings = {"sae": sae.full_cfg.to_dict(), "train": train}
            self.grid.assert_same("the SAE or training config", json.dumps(settings, sort_keys=True).encode())
        # Ranks that see different data: all of them, or the data-parallel replicas of a latent-sharded run.
        self.world_size = self.grid.replicas if self.grid else (dist.get_world_size() if self.distributed else 1)
        self.data_rank = self.grid.replica_rank if self.grid else self.rank
        self.data = as_source(
            data, self.cfg.batch_size, seed=self.cfg.seed, rank=self.data_rank, world_size=self.world_size
        )
        # d_in and d_out both: a transcoder refuses plain rows of the right total width (and an SAE pairs)
        check_widths(self.data, sae.cfg.d_in, sae.cfg.d_out)
        check_batch_size(sae.cfg, self.cfg.batch_size)
        self.device = sae.device
        params = [p for p in sae.parameters() if p.requires_grad]
        # The fused kernel updates each tensor in one pass: on 2 CPU threads at d_in=768, d_sae=16384 it took
        # 10 ms against 97 ms for the default foreach path; it runs on CPU and CUDA tensors. It also takes the
        # divergence guard's found_inf flag and skips the whole update on the device when it is set.
        self.fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(
            params,
            lr=self.cfg.lr,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            eps=self.cfg.adam_eps,
            fused=self.fused or None,
        )
        d_sae = sae.cfg.d_sae
        self.step = 0
        self.tokens = 0
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        # NaN/Inf input values counted on the device by training_forward (defer_checks), read at log steps
        self.nonfinite_inputs = torch.zeros((), dtype=torch.int64, device=self.device)
        self._dead_capacity: tuple[int, int, int, int] | None = None  # (first step, end step, tokens/step, bound)
        self.window_steps = 0
        self.window_tokens = 0
        self.act_scale: float | None = None
        self.out_scale: float | None = None  # a transcoder's scale of y (normalize_activations)
        self.last_metrics: dict[str, Any] = {}
        self.run_dir = Path(self.cfg.run_dir) if self.cfg.run_dir else None
        self.run_id = self.cfg.run_id
        self.last_checkpoint: Path | None = None
        self._lock = ckpt.RunLock(self.run_dir) if self.run_dir is not None else None
        self._claimed = False
        self._resumed_empty = False
        self._fvu_high_logs = 0
        self.skipped_before = 0  # updates skipped before this session (restored by resume)
        self._reset_guard()

    # -------------------------------------------------------------------------------------------------------------
    # schedules
    # -------------------------------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        total = cfg.total_steps(self.world_size)
        lr = cfg.lr
        if cfg.lr_warm_up_steps and step < cfg.lr_warm_up_steps:
            lr = cfg.lr * (step + 1) / cfg.lr_warm_up_steps
        decay_start = total - cfg.lr_decay_steps
        if cfg.lr_decay_steps and step >= decay_start:
            frac = (step - decay_start + 1) / cfg.lr_decay_steps
            lr = lr + (cfg.lr_end - lr) * min(1.0, frac)
        return lr

    def coefficient_scale(self, step: int) -> float:
        warm = self.cfg.sparsity_warm_up_steps
        return 1.0 if not warm else min(1.0, (step + 1) / warm)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def dead_capacity(self, step_tokens: int) -> int:
        """An upper bound on the number of dead latents at this step and every step up to the next refresh, for
        AuxK's static shapes (``training_forward(dead_capacity=...)``), with one host read per refresh.

        Refreshed every ``min(log_every, dead window / 4)`` steps (dead window: ``dead_tokens / step_tokens``
        steps): at the defaults (10M tokens, 4096-token batches, log every 50) that is once per log interval, at
        the step after a log step, whose metrics were read back anyway; a short dead window refreshes more often so
        that the bound stays tight (it admits latents idle for three quarters of the window). Exact:
        ``tokens_since_fired`` grows by ``step_tokens`` per step or drops to 0, so a latent that can be dead within
        the next ``j`` steps already has ``tokens_since_fired >= dead_tokens - j * step_tokens``. Rounded up to a
        multiple of 128 so that the shapes rarely change."""
        cached = self._dead_capacity
        if cached is not None and cached[0] <= self.step < cached[1] and cached[2] == step_tokens:
            return cached[3]
        window = max(1, self.cfg.dead_tokens // max(1, step_tokens))
        interval = min(max(1, self.cfg.log_every), max(1, window // 4))
        steps = interval - self.step % interval  # this step and those before the next refresh
        threshold = self.cfg.dead_tokens - (steps - 1) * step_tokens
        bound = int((self.tokens_since_fired >= threshold).sum())
        bound = min(self.sae.cfg.d_sae, 128 * math.ceil(bound / 128))
        self._dead_capacity = (self.step, self.step + steps, step_tokens, bound)
        return bound

    def check_inputs_finite(self) -> None:
        """Raises :class:`NonFiniteInputs` if the inputs of the steps since the last call held NaN or Inf: counted
        on the device by ``training_forward``, read here at log steps, so that a step never waits for the host.
        (Those steps' updates were skipped by the divergence guard: the state to resume from is intact.)"""
        count = int(self.nonfinite_inputs)
        if count:
            self.nonfinite_inputs.zero_()
            raise self._diverged(
                f"the training inputs held {count} non-finite value(s) (NaN or Inf) in the steps up to step "
                f"{self.step} (their updates were skipped)",
                "the input batch",
                [0.0] * (len(GUARD_TERMS) + 1),
                NonFiniteInputs,
            )

    # -------------------------------------------------------------------------------------------------------------
    # the loop
    # -------------------------------------------------------------------------------------------------------------

    def _checked(self, x: Tensor) -> Tensor:
        """A batch of exactly ``[batch_size, d_in]`` (a transcoder's: ``[batch_size, d_in + d_out]``; shapes only,
        no device sync); a source that cannot fill a batch is an error, not a silently smaller step."""
        width = self.sae.cfg.data_width
        if x.dim() != 2 or x.shape[0] != self.cfg.batch_size or x.shape[1] != width:
            what = f"d_in={width}" if not self.sae.cfg.is_transcoder else f"d_in + d_out={width}"
            raise DataError(
                f"the data gave a batch of shape {tuple(x.shape)} at step {self.step}, but training needs "
                f"[batch_size={self.cfg.batch_size}, {what}]"
            )
        return x

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.sae.dtype, non_blocking=True)

    def _first_batch(self, batch: Tensor) -> None:
        """Input scale(s) and b_dec from the first batch (rank 0's, broadcast so all ranks start identical). A
        transcoder's x and y get a scale each, and b_dec (in y's space) comes from y."""
        sae = self.sae
        x, y = self._split(batch)
        if sae.cfg.normalize_activations == "expected_average_only_in":
            mean_norm = x.float().norm(dim=-1).mean()
            self.act_scale = float(math.sqrt(sae.cfg.d_in) / mean_norm.clamp_min(1e-12))
            if y is not None:
                out_norm = y.float().norm(dim=-1).mean()
                self.out_scale = float(math.sqrt(sae.cfg.out_width) / out_norm.clamp_min(1e-12))
        if self.cfg.b_dec_init != "keep":
            x, y = self._split(self._scale(batch))
            sae.init_b_dec(x if y is None else y, self.cfg.b_dec_init)
        if self.distributed:
            for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
                if self.grid is not None and self.grid.replicas > 1 and name in LATENT_DIM:
                    # a latent slice: its owner in replica 0 is the global rank equal to the slice index
                    dist.broadcast(tensor.data, src=self.grid.shard_rank, group=self.grid.replica_group)
                elif self.grid is None or name not in LATENT_DIM:
                    dist.broadcast(tensor.data, src=0)
            scale = torch.tensor(
                [self.act_scale or 0.0, self.out_scale or 0.0], dtype=torch.float64, device=self.device
            )
            dist.broadcast(scale, src=0)
            self.act_scale = float(scale[0]) or None
            self.out_scale = float(scale[1]) or None

    def _split(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x, y)`` of a transcoder's ``[x | y]`` rows (:func:`fusedsae.data.split_pair`); ``(batch, None)`` for
        an SAE."""
        if not self.sae.cfg.is_transcoder:
            return batch, None
        return split_pair(batch, self.sae.cfg.d_in)

    def _scale(self, batch: Tensor) -> Tensor:
        """The batch with the input scale(s) applied: a transcoder's x and y columns each by its own factor."""
        if self.act_scale is None:
            return batch
        if self.out_scale is None:
            return batch * self.act_scale
        x, y = split_pair(batch, self.sae.cfg.d_in)
        return torch.cat([x * self.act_scale, y * self.out_scale], dim=-1)

    def _all_reduce_grads(self, flags: Tensor) -> Tensor:
        """Averages the gradients over ranks; the guard's ``flags`` ride along in the same all-reduce (summed), so
        every rank skips the same steps without a second collective. Returns the summed flags."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = torch.cat([*(g.reshape(-1) for g in grads), flags.to(grads[0].dtype)])
        if self.grid is not None:  # a slice's gradient is averaged over the replicas holding the same slice
            self.grid.sum_over_replicas(flat)
        else:
            dist.all_reduce(flat)
        flags = flat[-flags.numel() :].float()
        flat = flat[: -flags.numel()] / self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flags

    # -------------------------------------------------------------------------------------------------------------
    # divergence guard (device-side; read at log and checkpoint steps only)
    # -------------------------------------------------------------------------------------------------------------

    def _reset_guard(self) -> None:
        dev = self.device
        self._found_inf = torch.zeros((), dtype=torch.float32, device=dev)  # fused Adam's skip flag
        self._one = torch.ones((), dtype=torch.float32, device=dev)
        self._dev_step = torch.full((), self.step, dtype=torch.int64, device=dev)
        self._bad_run = torch.zeros((), dtype=torch.int64, device=dev)  # consecutive skipped steps, now
        self._bad_max = torch.zeros((), dtype=torch.int64, device=dev)  # longest such streak
        self._bad_total = torch.zeros((), dtype=torch.int64, device=dev)  # skipped steps in this session
        self._bad_step = torch.zeros((), dtype=torch.int64, device=dev)  # the latest skipped step (1-based)
        # flags of GUARD_TERMS at the latest skipped step, then its largest |input|
        self._bad_info = torch.zeros(len(GUARD_TERMS) + 1, dtype=torch.float32, device=dev)
        self._bad_reported = 0
        self._slot_index: dict[tuple[str, ...], Tensor] = {}

    def _step_flags(self, x: Tensor, out: TrainingOutput) -> tuple[Tensor, Tensor]:
        """``(flags [len(GUARD_TERMS) - 1] float32, absmax [] float32)``: > 0 where the inputs or a loss term are
        non-finite (the gradients' flag is added after the all-reduce); the batch's largest ``|x|`` (NaN/Inf when
        an input is). Four small kernels whatever the number of terms (stack, isfinite, scatter), no host sync."""
        absmax = x.detach().abs().amax().float()
        names = tuple(out.losses)
        slots = self._slot_index.get(names)
        if slots is None:  # which flag slot each watched value goes to; one small host->device copy per loss set
            other = GUARD_TERMS.index("loss")
            index = [0, *(GUARD_TERMS.index(n) if n in GUARD_TERMS else other for n in names), other]
            slots = self._slot_index[names] = torch.tensor(index, device=self.device)
        watched = torch.stack([absmax, *(t.detach().float() for t in out.losses.values()), out.loss.detach().float()])
        bad = (~torch.isfinite(watched)).float()
        flags = torch.zeros(len(GUARD_TERMS) - 1, dtype=torch.float32, device=self.device)
        return flags.index_add_(0, slots, bad), absmax  # counts of 0/1 (exact in any order); > 0 means bad

    def _guard_update(self, flags: Tensor, absmax: Tensor) -> Tensor:
        """Sets ``_found_inf`` from the loss flags and the (reduced) gradients and updates the skip counters;
        returns the step's "bad" flag (0-dim bool)."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        self._found_inf.zero_()
        # Sets found_inf to 1 if any gradient holds a NaN/Inf (multiplying by 1 leaves them bit-identical); the
        # op GradScaler uses, one fused pass over the gradients on CUDA.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._one)
        if self.grid is not None:  # a slice's bad gradient must skip the step on every slice
            self.grid.sum_over_shards(self._found_inf)
        grad_bad = self._found_inf.clone()
        self._found_inf.copy_(torch.maximum(self._found_inf, (flags > 0).float().amax()))
        bad = self._found_inf > 0
        self._dev_step += 1
        self._bad_run = (self._bad_run + 1) * bad
        self._bad_max = torch.maximum(self._bad_max, self._bad_run)
        self._bad_total += bad
        self._bad_step = torch.where(bad, self._dev_step, self._bad_step)
        info = torch.cat([(flags > 0).float(), grad_bad.view(1), absmax.view(1)])
        self._bad_info = torch.where(bad, info, self._bad_info)
        return bad

    def check_divergence(self) -> None:
        """Reads the guard's counters and checks every weight for NaN/Inf (one host synchronisation: the trainer
        calls it at log and checkpoint steps). Raises :class:`TrainingDiverged` past the threshold; warns about
        newly skipped steps below it."""
        tensors = [
            (n, t) for n, t in [*self.sae.named_parameters(), *self.sae.named_buffers()] if t.is_floating_point()
        ]
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors]).float()
        counters = torch.stack([self._bad_max, self._bad_total, self._bad_step]).float()
        values = torch.cat([counters, self._bad_info, finite]).tolist()
        bad_max, bad_total, bad_step = (int(v) for v in values[:3])
        info = values[3 : 4 + len(GUARD_TERMS)]
        broken = [name for (name, _), ok in zip(tensors, values[4 + len(GUARD_TERMS) :]) if not ok]
        if broken:
            raise self._diverged(
                f"the weights became non-finite ({', '.join(broken)}) by step {self.step}", "weights", info
            )
        if bad_max >= self.cfg.max_bad_steps:
            term = self._bad_term(info)
            raise self._diverged(
                f"{term} went non-finite (NaN/Inf) in {bad_max} consecutive steps, the last at step {bad_step} "
                "(their updates were skipped)",
                term,
                info,
            )
        if bad_total > self._bad_reported and self.rank == 0:
            warnings.warn(
                f"skipped {bad_total - self._bad_reported} update(s): {self._bad_term(info)} went non-finite, "
                f"the latest at step {bad_step} (largest |input| {info[-1]:.3g}); training continues, and stops "
                f"after {self.cfg.max_bad_steps} such steps in a row",
                RuntimeWarning,
                stacklevel=2,
            )
        self._bad_reported = bad_total

    @staticmethod
    def _bad_term(info: list[float]) -> str:
        names = [name for name, flag in zip(GUARD_TERMS, info) if flag]
        if "inputs" in names:
            return "the input batch"
        terms = [n for n in names if n != "gradients"]
        if terms:
            return " and ".join(t for t in terms if t != "loss" or len(terms) == 1)
        return "the gradient" if names else "the loss"

    def _diverged(
        self, what: str, term: str, info: list[float], kind: type[TrainingDiverged] | None = None
    ) -> TrainingDiverged:
        absmax = info[-1]
        if term == "the input batch":
            advice = "the data holds NaN/Inf values: check or re-create it"
        elif not math.isfinite(absmax) or absmax > 1e15:
            advice = f"the inputs hold huge values (largest |x| {absmax:.3g}): clean or rescale the data"
        elif self.sae.cfg.dtype == "float16":
            advice = "float16 overflowed: train in bfloat16 or float32 (--dtype)"
        else:
            advice = f"lower the learning rate (--lr, now {self.cfg.lr:g}) or clip gradients (max_grad_norm)"
        where = (
            f"last good checkpoint {self.last_checkpoint} (continue from it with --resume)"
            if self.last_checkpoint is not None
            else "no checkpoint was written"
        )
        return (kind or TrainingDiverged)(
            f"training diverged at step {self.step}: {what}; {where}; try: {advice}",
            self.step,
            term,
            self.last_checkpoint,
        )

    def _watch_fvu(self, metrics: dict[str, Any]) -> None:
        fvu = metrics.get("fvu", 0.0)
        self._fvu_high_logs = self._fvu_high_logs + 1 if fvu > FVU_WARNING else 0
        if self._fvu_high_logs == FVU_WARNING_LOGS and self.rank == 0:
            warnings.warn(
                f"fvu has been above {FVU_WARNING:g} for {FVU_WARNING_LOGS} logs (now {fvu:.3g} at step "
                f"{self.step}): the reconstruction is diverging; try a lower learning rate (--lr, now "
                f"{self.cfg.lr:g})",
                RuntimeWarning,
                stacklevel=2,
            )

    def train_step(self, x: Tensor) -> TrainingOutput:
        """One optimizer step on batch ``x [batch, d_in]`` (a transcoder's ``[x | y]`` rows ``[batch, d_in +
        d_out]``), already on the device.

        A step whose inputs, loss or gradients hold a NaN/Inf changes nothing (weights, Adam's moments, firing
        counters); the guard counts it on the device (see :meth:`check_divergence`).
        """
        sae, cfg = self.sae, self.cfg
        if self.step == 0 and self.tokens == 0:
            if self.grid is not None:  # the ranks sharing the latents must share every batch
                batch = x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                self.grid.assert_same("the first batch", batch, over_shards=True)
            self._first_batch(x)
        x = self._scale(x)
        inputs, target = self._split(x)
        pair = (inputs,) if target is None else (inputs, target)  # the sharded SAE (no transcoders) takes no y
        sae.train()
        dead = capacity = None
        if sae.cfg.aux_k:
            dead = self.dead_mask()
            capacity = self.dead_capacity(x.shape[0] * self.world_size)
        out = sae.training_forward(
            *pair,
            dead_mask=dead,
            coefficient_scale=self.coefficient_scale(self.step),
            dead_capacity=capacity,
            defer_checks=True,
            # data parallel: AuxK normalised by the global batch's residual variance (the sharded SAE does its own)
            **({"batch_sum": _sum_over_ranks} if self.distributed and self.grid is None else {}),
        )
        if out.nonfinite is not None:
            self.nonfinite_inputs += out.nonfinite
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        flags, absmax = self._step_flags(x, out)
        if self.distributed:
            flags = self._all_reduce_grads(flags)
        bad = self._guard_update(flags, absmax)
        if sae.cfg.normalize_decoder:
            sae.remove_parallel_decoder_grad()
        if cfg.max_grad_norm is not None:
            if isinstance(sae, ShardedAutoencoder):
                sae.clip_grad_norm_(cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.fused:
            self.optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(bad):  # other devices: the unfused Adam has no found_inf, so this one check syncs
            self.optimizer.step()
        if sae.cfg.normalize_decoder:
            sae.normalize_decoder_rows(skip=bad)
        if sae.cfg.activation == "jumprelu":
            with torch.no_grad():
                sae.threshold.clamp_(min=0.0)
        with torch.no_grad():
            counts = out.firing_counts()
            if self.grid is not None:
                self.grid.sum_over_replicas(counts)
            elif self.distributed:
                dist.all_reduce(counts)
            global_tokens = x.shape[0] * self.world_size
            fired = torch.where(counts > 0, 0, self.tokens_since_fired + global_tokens)
            self.tokens_since_fired = torch.where(bad, self.tokens_since_fired, fired)
            self.fire_counts += torch.where(bad, 0, counts)
        self.window_steps += 1
        self.window_tokens += global_tokens
        self.step += 1
        self.tokens += global_tokens
        return out

    def batch_metrics(self, out: TrainingOutput) -> dict[str, float]:
        """Metrics of one step's output (contract names) plus the run's counters."""
        with torch.no_grad():
            values = {
                "loss": out.loss.detach().float(),
                **{k: v.detach().float() for k, v in out.losses.items()},
                "l0": out.l0(),
                "mse": M.mse(out.target, out.sae_out),
                "explained_variance_legacy": M.explained_variance_legacy(out.target, out.sae_out),
            }
            # FVU is a ratio: average its moments over the ranks, not the ranks' ratios (the global batch's FVU)
            moments = M.fvu_moments(out.target, out.sae_out)
            stacked = torch.cat([torch.stack([v.to(self.device).double() for v in values.values()]), moments])
            if self.grid is not None:  # the ranks of a shard group hold the same values: average the replicas
                self.grid.sum_over_replicas(stacked)
                stacked /= self.world_size
            elif self.distributed:
                dist.all_reduce(stacked)
                stacked /= self.world_size
            result = {k: float(v) for k, v in zip(values, stacked.tolist())}
            result["fvu"] = float(M.fvu_from_moments(stacked[len(values) :]))
        result["explained_variance"] = 1.0 - result["fvu"]
        dead = self.dead_mask().sum().reshape(1)
        if self.grid is not None:
            self.grid.sum_over_shards(dead)
        result["dead_fraction"] = float(dead) / self.full_d_sae
        ground_truth = getattr(self.data, "ground_truth", None)
        if ground_truth is not None:
            W_dec = self.sae.W_dec if self.grid is None else self.sae.gather_tensor("W_dec", self.sae.W_dec.detach())
            result["mmcs"] = float(M.mmcs(ground_truth.to(self.device), W_dec))
        result.update(step=self.step, tokens=self.tokens, lr=self.lr_at(max(0, self.step - 1)))
        result["skipped_steps"] = self.skipped_before + self._bad_reported
        return result

    def train(self) -> dict[str, Any]:
        """Trains until ``cfg.total_steps()``; returns the last metrics (plus ``tokens_per_s``).

        Raises :class:`TrainingDiverged` when the divergence guard stops the run, and
        :class:`fusedsae.checkpoint.RunFolderError` when ``run_dir`` holds another run or is locked.
        """
        cfg = self.cfg
        total = cfg.total_steps(self.world_size)
        if self.step == 0:  # a resumed run keeps the RNG state its checkpoint restored
            torch.manual_seed(cfg.seed + self.data_rank)
        if self.run_dir is not None:
            self.start_run()  # before anything is written (a no-op after resume)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, leave=True)
        session_start = time.perf_counter()
        session_tokens = 0
        out = None
        try:
            while self.step < total:
                if self.window_steps >= cfg.sparsity_window_steps:  # a new window starts with this step
                    self._reset_window()
                x = self._prepare(self._checked(self.data.next_batch()))
                out = self.train_step(x)
                session_tokens += x.shape[0] * self.world_size
                last = self.step == total
                checkpoint = self.run_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if self.step % cfg.log_every == 0 or last or checkpoint:
                    self.check_divergence()
                if self.step % cfg.log_every == 0 or last:
                    self.check_inputs_finite()
                    metrics = self.batch_metrics(out)
                    metrics["tokens_per_s"] = session_tokens / max(1e-9, time.perf_counter() - session_start)
                    self._log(metrics)
                    self._watch_fvu(metrics)
                    if bar is not None:
                        bar.set_postfix(
                            l0=f"{metrics['l0']:.1f}",
                            fvu=f"{metrics['fvu']:.3f}",
                            dead=f"{metrics['dead_fraction']:.2f}",
                        )
                if bar is not None:
                    bar.update(1)
                if checkpoint and not last:
                    self.save_checkpoint()
            if self.run_dir is not None:
                if out is not None:
                    self.save_checkpoint()
                # also when resumed at the last step: a run killed between its last checkpoint and its SAE folder
                # gets the folder (and summary.json) now
                self.save_final()
        finally:
            if bar is not None:
                bar.close()
            self._close_callbacks()
            self.close()
        return self.last_metrics

    def close(self) -> None:
        """Releases the run folder's lock (``train`` does it when it ends)."""
        if self._lock is not None:
            self._lock.release()

    def _close_callbacks(self) -> None:
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()

    def _reset_window(self) -> None:
        self.fire_counts.zero_()
        self.window_steps = 0
        self.window_tokens = 0

    def _log(self, metrics: dict[str, Any]) -> None:
        self.last_metrics = metrics
        if self.rank != 0:
            return
        if self.run_dir is not None:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        for callback in self.callbacks:
            callback(metrics)

    # -------------------------------------------------------------------------------------------------------------
    # the run folder
    # -------------------------------------------------------------------------------------------------------------

    def _on_rank0(self, action: Callable[[], None]) -> None:
        """Runs ``action`` on rank 0; under torch.distributed every rank then raises rank 0's error (a folder or
        checkpoint problem), so no rank is left waiting at the next collective."""
        error: Exception | None = None
        if self.rank == 0:
            try:
                action()
            except (RunFolderError, CheckpointError) as exc:
                error = exc
        if self.distributed:
            box: list[Any] = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                kind = {"RunFolderError": RunFolderError, "CheckpointMismatch": CheckpointMismatch}
                error = kind.get(box[0][0], CheckpointError)(box[0][1])
        if error is not None:
            raise error

    def start_run(self) -> None:
        """Claims ``run_dir`` for a new run (idempotent; :meth:`train` calls it): locks it, removes what a crash
        left, and refuses a folder holding another run unless ``cfg.overwrite``."""
        if self._claimed or self.run_dir is None:
            return
        if self.run_id is None:
            self.run_id = ckpt.new_run_id()
        run_dir, run_id = self.run_dir, self.run_id

        def claim() -> None:
            assert self._lock is not None
            self._lock.acquire()
            try:
                ckpt.claim_run_dir(run_dir, run_id, self.cfg.overwrite, own_log=self._resumed_empty)
            except BaseException:
                self._lock.release()
                raise

        self._on_rank0(claim)
        if self.distributed:  # every rank uses rank 0's run id
            box = [self.run_id]
            dist.broadcast_object_list(box, src=0)
            self.run_id = box[0]
        self._claimed = True

    # -------------------------------------------------------------------------------------------------------------
    # files
    # -------------------------------------------------------------------------------------------------------------

    def feature_density(self) -> Tensor:
        """Firing frequency of each latent over the current window: tokens on which it fired / tokens (what
        SAELens's ``sparsity.safetensors`` stores, as log10(frequency + 1e-10))."""
        return self.fire_counts.double() / max(1, self.window_tokens)

    @property
    def full_d_sae(self) -> int:
        return self.sae.full_cfg.d_sae if isinstance(self.sae, ShardedAutoencoder) else self.sae.cfg.d_sae

    def full_sae(self) -> SparseAutoencoder:
        """The whole SAE being trained (a latent-sharded run gathers it: every rank must call this)."""
        return self.sae.full_sae() if isinstance(self.sae, ShardedAutoencoder) else self.sae

    def inference_sae(self) -> SparseAutoencoder:
        """A copy of the SAE with the input scale folded in: it takes raw activations (a latent-sharded run
        gathers it: every rank must call this)."""
        sae = copy.deepcopy(self.full_sae()).eval()
        if self.act_scale is not None:
            sae.fold_activation_norm_scaling_factor(self.act_scale, self.out_scale)
        return sae

    def _refuse_nonfinite(self, tensors: dict[str, Tensor], what: str) -> None:
        bad = ckpt.nonfinite_tensors(tensors)
        if bad:
            raise self._diverged(
                f"refusing to write {what}: {', '.join(bad)} hold NaN/Inf", "weights", [0.0] * (len(GUARD_TERMS) + 1)
            )

    def save_final(self) -> Path | None:
        """Writes ``sae/`` and ``summary.json`` (rank 0); refuses (TrainingDiverged) an SAE with a NaN/Inf. In a
        latent-sharded run every rank must call this: each writes its slice's part of the folder, nothing is
        gathered (:meth:`ShardedAutoencoder.save`)."""
        if self.run_dir is None:
            return None
        density = self.feature_density()
        if isinstance(self.sae, ShardedAutoencoder):
            return self._save_final_sliced(density)
        sae = self.inference_sae()
        if self.rank != 0:
            return None
        self._refuse_nonfinite(dict(sae.state_dict()), f"{self.run_dir / FINAL_SAE_DIR}")
        sparsity = torch.log10(density.cpu() + 1e-10).float()
        path = sae.save(self.run_dir / FINAL_SAE_DIR, sparsity=sparsity)
        self._write_summary()
        return path

    def _save_final_sliced(self, density: Tensor) -> Path | None:
        """:meth:`save_final` of a latent-sharded run: the ranks of one replica write the folder from their
        slices (the inference SAE's: input scale folded in, elementwise, as :meth:`inference_sae` folds it)."""
        assert isinstance(self.sae, ShardedAutoencoder) and self.grid is not None and self.run_dir is not None
        part = self.sae
        if self.act_scale is not None:  # a copy of the slice only (the grid and its process groups are shared)
            part = copy.deepcopy(self.sae, {id(self.grid): self.grid})
            part.fold_activation_norm_scaling_factor(self.act_scale, self.out_scale)
        self._refuse_nonfinite_sliced(dict(part.state_dict()), f"{self.run_dir / FINAL_SAE_DIR}")
        path = None
        if self.grid.replica_rank == 0:  # the other replicas hold the same slices
            path = part.save(self.run_dir / FINAL_SAE_DIR, sparsity=torch.log10(density.cpu() + 1e-10).float())
        if self.distributed:
            dist.barrier()
        if self.rank != 0:
            return None
        self._write_summary()
        return path

    def _write_summary(self) -> None:
        assert self.run_dir is not None
        summary = {
            "run_id": self.run_id,
            "metrics": self.last_metrics,
            "sae": self.full_sae_config().to_dict(),
            "train": asdict(self.cfg),
            "data": self.data.describe() if hasattr(self.data, "describe") else {},
            "act_scale": self.act_scale,
            "act_scale_out": self.out_scale,
        }
        atomic_write(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")

    def _refuse_nonfinite_sliced(self, tensors: dict[str, Tensor], what: str) -> None:
        """:meth:`_refuse_nonfinite` of the whole dictionary from its slices: every rank raises the same error
        (the flags are summed over the shard group)."""
        assert self.grid is not None
        names = sorted(tensors)
        mine = set(ckpt.nonfinite_tensors(tensors))
        flags = torch.tensor([name in mine for name in names], dtype=torch.int64, device=self.device)
        bad = [name for name, flag in zip(names, self.grid.sum_over_shards(flags).tolist()) if flag]
        if bad:
            raise self._diverged(
                f"refusing to write {what}: {', '.join(bad)} hold NaN/Inf", "weights", [0.0] * (len(GUARD_TERMS) + 1)
            )

    def full_sae_config(self) -> SAEConfig:
        return self.sae.full_cfg if isinstance(self.sae, ShardedAutoencoder) else self.sae.cfg

    def _param_names(self) -> list[str]:
        """Optimizer parameter ids → names (the optimizer's order)."""
        return [name for name, p in self.sae.named_parameters() if p.requires_grad]

    def state_contents(self, sliced: bool = False) -> dict[str, Any]:
        """The whole training state, layout-independent: a latent-sharded run gathers every slice (every rank must
        call this), so the checkpoint is the one a single process would write.

        ``sliced`` (latent-sharded runs): no gathering; every tensor is this rank's
        :class:`~fusedsae.sharded_files.SlicedTensor` part of the whole one, which the ranks write into the same
        files (:meth:`save_checkpoint`); the files are byte for byte those of the gathered state."""
        opt_tensors, opt_meta = ckpt.optimizer_state(self.optimizer)
        model = dict(self.sae.state_dict())
        counters = {"tokens_since_fired": self.tokens_since_fired, "fire_counts": self.fire_counts}
        rng = {f"rng.{k}": v for k, v in ckpt.rng_state().items()}
        if isinstance(self.sae, ShardedAutoencoder) and sliced:
            sae, names = self.sae, self._param_names()
            model = {name: sae.sliced(name, t.detach()) for name, t in model.items()}
            opt_tensors = {key: sae.sliced(names[int(key.split(".")[1])], t) for key, t in opt_tensors.items()}
            counters = {key: sae.sliced("b_enc", t) for key, t in counters.items()}  # one entry per latent
            rng = {key: SlicedTensor(t) for key, t in rng.items()}
        elif isinstance(self.sae, ShardedAutoencoder):
            sae, names = self.sae, self._param_names()
            model = sae.full_state_dict()
            opt_tensors = {
                key: sae.gather_tensor(names[int(key.split(".")[1])], t) if t.dim() else t
                for key, t in opt_tensors.items()
            }
            counters = {key: self.grid.gather_slices(t, 0, self.full_d_sae) for key, t in counters.items()}
        return {
            "model.safetensors": model,
            "optimizer.safetensors": opt_tensors,
            "counters.safetensors": {**counters, **rng},
            "trainer.json": {
                "step": self.step,
                "tokens": self.tokens,
                "window_steps": self.window_steps,
                "window_tokens": self.window_tokens,
                "act_scale": self.act_scale,
                "act_scale_out": self.out_scale,
                "data": self.data.state_dict(),
                "data_source": describe_data(self.data),  # which data: a resume on other data is refused
                "sae_config": self.full_sae_config().to_dict(),
                "train_config": asdict(self.cfg),
                "optimizer": opt_meta,
                "world_size": self.world_size,
                "skipped_steps": self.skipped_before + self._bad_reported,
            },
        }

    def save_checkpoint(self) -> Path | None:
        """Writes a checkpoint of the current state (rank 0; other ranks wait for it). A state holding a NaN/Inf
        is never written (:class:`TrainingDiverged`)."""
        if self.run_dir is None:
            raise ValueError("TrainConfig.run_dir is not set: there is nowhere to write checkpoints")
        self.start_run()
        if isinstance(self.sae, ShardedAutoencoder):
            return self._save_checkpoint_sliced()
        path = None
        contents = self.state_contents() if self.rank == 0 else None
        if self.rank == 0:
            assert contents is not None
            state = {**contents["model.safetensors"], **contents["optimizer.safetensors"]}
            self._refuse_nonfinite(state, f"the step {self.step} checkpoint")
            path = ckpt.write_checkpoint(
                self.run_dir, self.step, contents, keep=self.cfg.keep_checkpoints, run_id=self.run_id
            )
            self.last_checkpoint = path
        if self.distributed:
            dist.barrier()
        return path

    def _save_checkpoint_sliced(self) -> Path | None:
        """:meth:`save_checkpoint` of a latent-sharded run without gathering: the ranks of one replica write their
        slices' parts of each safetensors file into a temporary folder (:mod:`fusedsae.sharded_files`), rank 0
        writes ``trainer.json``, then seals it (manifest, rename) once all parts are in."""
        assert self.grid is not None and self.run_dir is not None
        grid, run_dir, step = self.grid, self.run_dir, self.step
        contents = self.state_contents(sliced=True)
        state = {**contents["model.safetensors"], **contents["optimizer.safetensors"]}
        self._refuse_nonfinite_sliced({name: t.local for name, t in state.items()}, f"the step {step} checkpoint")
        path = None
        if grid.replica_rank == 0:  # the other replicas hold the same slices
            first = grid.shard_rank == 0
            tmp = Path(grid.share_from_first_shard(lambda: str(ckpt.begin_checkpoint(run_dir, step))))
            try:
                for name, content in contents.items():
                    if name.endswith(".safetensors"):
                        write_sliced_safetensors(tmp / name, content, first)
                    elif first:
                        write_json(tmp / name, content)
                grid.barrier_shards()  # every rank's parts are in, and fsynced
                if first:
                    path = ckpt.seal_checkpoint(
                        run_dir, step, tmp, list(contents), self.cfg.keep_checkpoints, self.run_id
                    )
                    self.last_checkpoint = path
            except BaseException:
                if first:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        if self.distributed:
            dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restores the newest usable checkpoint of ``run_dir`` (or ``path``). Returns False if the run has none.

        A checkpoint that is damaged, edited or holds a NaN/Inf is skipped (with a warning) for the next older one;
        when none is usable, :class:`fusedsae.checkpoint.CheckpointError` names each one and its problem.
        :class:`fusedsae.checkpoint.CheckpointMismatch` (no fallback): the checkpoint belongs to another run id or
        was written with settings that would change the result (it lists them). The folder is locked from here
        until :meth:`train` ends (:class:`fusedsae.checkpoint.RunFolderError` if another trainer holds it).
        """
        if path is None and self.run_dir is None:
            raise ValueError("resume needs TrainConfig.run_dir or a checkpoint path")
        if self.run_dir is not None:

            def lock() -> None:
                assert self._lock is not None and self.run_dir is not None
                self._lock.acquire()
                ckpt.remove_partial(self.run_dir)

            self._on_rank0(lock)
        try:
            if path is None:
                assert self.run_dir is not None
                found = ckpt.newest_usable(self.run_dir, self._load_checkpoint)
                if found is None:
                    self._resumed_empty = True
                    return False
                folder, contents = found
            else:
                folder = Path(path)
                contents = self._load_checkpoint(folder)
            self._restore(contents)
        except BaseException:
            self.close()
            raise
        self.last_checkpoint = folder
        self._claimed = self.run_dir is not None
        return True

    def _load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Reads and checks one checkpoint (files, fields, run id, settings, finiteness); raises CheckpointError or
        CheckpointMismatch (see :meth:`resume`)."""
        manifest = ckpt.read_manifest(folder)
        sliced = isinstance(self.sae, ShardedAutoencoder)
        # a latent-sharded run reads only its slices (memory O(slice), as when they were written)
        contents = ckpt.read_checkpoint(folder, self._slice_reader()) if sliced else ckpt.read_checkpoint(folder)
        state = check_trainer_state(contents, folder)
        owner = manifest.get("run_id")
        if self.run_id is not None and owner != self.run_id:
            raise CheckpointMismatch(
                f"{folder} belongs to run {owner}, not to this run {self.run_id}: it is another run's checkpoint "
                "(start a new run in another --out, or --overwrite this folder)"
            )
        try:
            saved_cfg = SAEConfig.from_dict(state["sae_config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{folder}/trainer.json: field 'sae_config' is not an SAE config ({exc})") from exc
        differences = setting_differences(saved_cfg, state["train_config"], self.full_sae_config(), self.cfg)
        if differences:
            raise CheckpointMismatch(f"{folder} was written for " + "; ".join(differences))
        if state["world_size"] != self.world_size:
            raise CheckpointMismatch(
                f"{folder} was written by {state['world_size']} data-parallel rank(s); resuming with "
                f"{self.world_size} would change the data order (the number of latent shards may change)"
            )
        record = state.get("data_source")
        if record is None:
            from fusedsae.data import ResumeWarning

            warnings.warn(
                f"{folder} does not record which data it was trained on (written by an older fusedsae): resuming "
                "without checking that this is that data",
                ResumeWarning,
                stacklevel=2,
            )
        elif not isinstance(record, dict):
            raise CheckpointError(
                f"{folder}/trainer.json: field 'data_source' is {repr(record)[:60]}, expected an object"
            )
        elif differing := data_differences(record, describe_data(self.data)):
            raise CheckpointMismatch(
                f"{folder} was trained on other data ({'; '.join(differing)}): give the data the run started with, "
                "or start a new run in another run_dir"
            )
        bad = [
            f"{file}: {name}"
            for file in ("model.safetensors", "optimizer.safetensors")
            for name in ckpt.nonfinite_tensors(contents[file])
        ]
        if sliced and self.grid is not None:  # every rank must skip the checkpoint that any slice of it spoils
            spoiled = self.grid.sum_over_shards(torch.tensor([len(bad)], device=self.device))
            if int(spoiled.item()) and not bad:
                bad = ["another rank's slice"]
        if bad:
            raise CheckpointError(
                f"{folder} holds NaN/Inf ({', '.join(bad[:4])}): it was written after training diverged"
            )
        if self.run_id is None:
            self.run_id = owner
        return contents

    def _slice_reader(self) -> Callable[[Path], dict[str, Tensor]]:
        """Reads this rank's slices of a checkpoint file (:meth:`ShardedAutoencoder.read_slices`)."""
        assert isinstance(self.sae, ShardedAutoencoder)
        sae, names = self.sae, self._param_names()

        def layout(key: str) -> str:
            if key.startswith("state."):  # optimizer state "state.<parameter id>.<name>": its parameter's layout
                pid = key.split(".")[1]
                return names[int(pid)] if pid.isdigit() and int(pid) < len(names) else key
            return "b_enc" if key in ("tokens_since_fired", "fire_counts") else key  # one entry per latent

        return lambda path: sae.read_slices(path, layout)

    def _restore(self, contents: dict[str, Any]) -> None:
        state = contents["trainer.json"]
        model = {k: v.to(self.device) for k, v in contents["model.safetensors"].items()}
        opt_tensors = {
            k: v.to(self.device) if not k.endswith(".step") else v for k, v in contents["optimizer.safetensors"].items()
        }
        counters = contents["counters.safetensors"]
        tokens_since_fired, fire_counts = counters["tokens_since_fired"], counters["fire_counts"]
        # a latent-sharded run read only its slices of the whole dictionary's tensors (_slice_reader)
        self.sae.load_state_dict(model)
        ckpt.load_optimizer_state(self.optimizer, opt_tensors, state["optimizer"])
        self.tokens_since_fired = tokens_since_fired.to(self.device)
        self._dead_capacity = None  # bounded from the restored counters at the next step
        self.fire_counts = fire_counts.to(self.device)
        ckpt.set_rng_state({k.removeprefix("rng."): v for k, v in counters.items() if k.startswith("rng.")})
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.window_steps = int(state["window_steps"])
        self.window_tokens = int(state["window_tokens"])
        self.act_scale = state["act_scale"]
        self.out_scale = state.get("act_scale_out")  # absent in checkpoints of SAEs written before transcoders
        self.data.load_state_dict(state["data"])
        skipped = state.get("skipped_steps", 0)
        self.skipped_before = skipped if isinstance(skipped, int) else 0
        self._reset_guard()
        if self.run_dir is not None and self.rank == 0:
            self._truncate_log(self.step)
            lines = (
                (self.run_dir / METRICS_FILE).read_text().splitlines() if (self.run_dir / METRICS_FILE).exists() else []
            )
            self.last_metrics = json.loads(lines[-1]) if lines else {}

    def _truncate_log(self, step: int) -> None:
        """Drops log lines written after the checkpoint, so a resumed run's log matches an uninterrupted one."""
        assert self.run_dir is not None
        log = self.run_dir / METRICS_FILE
        if not log.exists():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by the crash
        atomic_write(log, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------------
# checks shared by the trainer and the CLI
# ---------------------------------------------------------------------------------------------------------------

_TRAINER_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "tokens": (int,),
    "window_steps": (int,),
    "window_tokens": (int,),
    "act_scale": (float, int, type(None)),
    "data": (dict,),
    "sae_config": (dict,),
    "train_config": (dict,),
    "optimizer": (dict,),
    "world_size": (int,),
}
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "counters.safetensors", "trainer.json")


def check_trainer_state(contents: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Validates a checkpoint's files and ``trainer.json`` field by field; returns ``trainer.json``'s data or raises
    :class:`CheckpointError` naming the file and field."""
    missing = [name for name in _CHECKPOINT_FILES if name not in contents]
    if missing:
        raise CheckpointError(f"{folder}: the manifest lists no {', '.join(missing)}; not a fusedsae trainer state")
    state = contents["trainer.json"]
    for name, types in _TRAINER_FIELDS.items():
        value = state.get(name)
        if name not in state or not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(
                f"{folder}/trainer.json: field {name!r} is {'missing' if name not in state else repr(value)[:60]}, "
                f"expected {' or '.join(t.__name__ for t in types)}; the checkpoint was edited or damaged"
            )
    out_scale = state.get("act_scale_out")
    if out_scale is not None and (not isinstance(out_scale, (float, int)) or isinstance(out_scale, bool)):
        raise CheckpointError(
            f"{folder}/trainer.json: field 'act_scale_out' is {repr(out_scale)[:60]}, expected float or null; the "
            "checkpoint was edited or damaged"
        )
    counters = contents["counters.safetensors"]
    for name in ("tokens_since_fired", "fire_counts", "rng.torch"):
        if name not in counters:
            raise CheckpointError(f"{folder}/counters.safetensors lacks {name!r}; the checkpoint was damaged")
    return state


def _sum_over_ranks(t: Tensor) -> Tensor:
    """Sums ``t`` over all ranks, in place; returns it."""
    dist.all_reduce(t)
    return t


def json_plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, other objects their ``str``), for comparing a
    setting with its saved copy."""
    return json.loads(json.dumps(value, default=str))


def setting_differences(
    saved_sae: SAEConfig, saved_train: dict[str, Any], sae: SAEConfig, train: TrainConfig
) -> list[str]:
    """The settings in which a checkpoint (its SAE config and train config) differs from this run's, as
    ``"an SAE with d_sae=64, but this SAE has d_sae=32"`` phrases; the device and :data:`RESUME_MAY_CHANGE` may
    differ."""
    out = []
    mine, theirs = json_plain(sae.to_dict()), json_plain(saved_sae.to_dict())
    for name in mine:
        if name != "device" and mine[name] != theirs.get(name):
            out.append(f"an SAE with {name}={theirs.get(name)!r}, but this SAE has {name}={mine[name]!r}")
    mine_train = json_plain(asdict(train))
    for name in mine_train:
        if name not in RESUME_MAY_CHANGE and name in saved_train and json_plain(saved_train[name]) != mine_train[name]:
            out.append(f"{name}={saved_train[name]!r}, but this run has {name}={mine_train[name]!r}")
    return out


# describe() fields that say where the data is, not what it is: a cache folder may move between sessions (its
# rows, width and capture settings still identify it)
DATA_LOCATION_FIELDS = frozenset({"path"})


def describe_data(source: Any) -> dict[str, Any]:
    """The source's ``describe()`` as it reads back from JSON (``{}`` for a source without one): kind, shapes, seed,
    a content fingerprint where cheap (see :mod:`fusedsae.data`)."""
    return json_plain(source.describe()) if hasattr(source, "describe") else {}


def data_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields in which a checkpoint's record of its data and this run's data differ, as ``"n=1000 then, 2000
    now"`` phrases. Only fields both descriptions hold are compared (a field added to ``describe()`` later does not
    make older checkpoints unusable; a source of another kind differs in ``kind``), except
    :data:`DATA_LOCATION_FIELDS`."""
    names = [name for name in saved if name in now and name not in DATA_LOCATION_FIELDS]
    return [f"{name}={saved[name]!r} then, {now[name]!r} now" for name in names if saved[name] != now[name]]


def check_batch_size(cfg: SAEConfig, batch_size: int) -> None:
    """Refuses batch sizes at which a loss term is meaningless, with the reason.

    AuxK normalises its error by the variance of the batch's residuals (Gao et al.), which one token does not have:
    TopK/BatchTopK with ``aux_k > 0`` need at least 2 tokens per step on each rank (checked per rank, so that a rank's
    own settings decide it, although under data parallelism the normaliser is the global batch's).
    The other terms are means over tokens, defined for any batch of at least one token; normalised *metrics* of a
    batch without variance are NaN (:mod:`fusedsae.metrics`).
    """
    if cfg.activation in SPARSE_ACTIVATIONS and cfg.aux_k and batch_size < 2:
        raise ValueError(
            f"batch size {batch_size} is too small for the AuxK loss of a {cfg.activation} SAE: it divides by the "
            "variance of the batch's residuals, which needs at least 2 tokens; use a batch size >= 2 (or aux_k=0)"
        )


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's ``run_config.json`` (size-checked, parsed, an object), or :class:`RunFolderError`."""
    return read_json(path, error=RunFolderError)
