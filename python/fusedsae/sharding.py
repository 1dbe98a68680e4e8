"""Latent sharding over ``torch.distributed``: S ranks share one dictionary, each holding a contiguous slice of
the latents (its ``W_enc`` columns, ``b_enc``, ``W_dec`` rows, ``threshold`` and their optimizer state), with an
exact distributed TopK; composable with data parallelism as a 2-D grid ``world = S × replicas``.

The maths (docs/scaling.md):

* **Exact TopK.** Each rank selects its local top-k per row (the fused kernel; ties by the lower index), the
  ``S·k`` candidates per row are all-gathered with their *global* indices, and the global top-k is kept, ordered
  by value then global index. The global top-k is a subset of the union of the local top-ks, and both selections
  break ties by the lower index, so the result is the single-device selection exactly (ties across shard
  boundaries included). AuxK does the same among dead latents (TopK and BatchTopK); BatchTopK gathers each rank's
  local batch top-``k·N`` (a subset argument over the flattened batch, ties by the global row-major index).
* **Decoder.** Each rank decodes its own active latents into a partial ``[N, d_in]``; the partials are summed
  (all-reduce). Every rank then holds the same ``x̂`` and computes the same loss, so the all-reduce's backward is
  the identity, and the sparse backward touches only the rank's own active latents. Matryoshka prefix widths cut
  across the slices: each rank's partial prefix reconstructions are summed the same way.
* **Replicated parameters.** ``b_dec`` enters the decoder (the same gradient on every shard) and, when
  ``apply_b_dec_to_input``, the encoder of every shard (partial gradients): the encoder sees it through
  :class:`_CopyToShards`, whose backward sums the partial gradients over the shard group.
* **Data parallel.** Gradients of a shard are averaged over its replica group (the ranks holding the same slice);
  AuxK's residual variance is taken over the global batch.
* **Files.** :meth:`ShardedAutoencoder.save` and the Trainer's checkpoints are the whole dictionary's files, each
  rank writing its slice's bytes into them (:mod:`fusedsae.sharded_files`); resuming reads only the slice
  (:meth:`ShardedAutoencoder.read_slices`). Nothing is gathered on one rank.

Ranks ``[r·S, (r+1)·S)`` form replica r's shard group; ranks ``s, s+S, s+2S, …`` form slice s's replica group.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fusedsae import functional as F
from fusedsae import metrics as M
from fusedsae import reference
from fusedsae.config import SPARSE_ACTIVATIONS, SAEConfig
from fusedsae.formats import (
    CFG_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    replace_dir,
    sae_lens_config,
    sae_tensors,
    write_json,
)
from fusedsae.sae import SparseAutoencoder, TrainingOutput
from fusedsae.sharded_files import SlicedTensor, write_sliced_safetensors

__all__ = [
    "INIT_BLOCK",
    "LATENT_DIM",
    "ProcessGrid",
    "ShardedAutoencoder",
    "ShardedTrainingOutput",
    "merge_candidates",
    "shard_bounds",
]

# Latents are initialised in blocks of this many, each from its own seed, so that the initialisation is the same
# whatever the number of shards.
INIT_BLOCK = 4096

# Which dimension of each parameter/buffer runs over the latents (absent: replicated).
LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


def shard_bounds(d_sae: int, shards: int, index: int) -> tuple[int, int]:
    """The contiguous latent range ``[start, stop)`` of slice ``index`` of ``shards`` (sizes differ by at most 1)."""
    if not 0 <= index < shards:
        raise ValueError(f"slice {index} does not exist among {shards} shards")
    return index * d_sae // shards, (index + 1) * d_sae // shards


class ProcessGrid:
    """The 2-D layout of the ranks: ``world = shards × replicas``.

    Built once per run (``torch.distributed.new_group`` must be called by every rank in the same order). Without
    an initialised process group it describes one process: one shard, one replica, no communication.
    """

    def __init__(self, shards: int = 1) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if shards < 1:
            raise ValueError(f"--shard-latents must be >= 1, got {shards}")
        if world % shards:
            raise ValueError(
                f"--shard-latents {shards} does not divide the world size {world}: "
                f"use a divisor of {world} (world = shards × data-parallel replicas)"
            )
        self.world, self.rank, self.shards = world, rank, shards
        self.replicas = world // shards
        self.shard_rank, self.replica_rank = rank % shards, rank // shards
        self.shard_group: Any = None
        self.replica_group: Any = None
        # Logical payload the collectives brought in from other ranks, (S − 1) × size each (benchmarks read it; a
        # ring all-reduce moves 2(S − 1)/S × size on the wire).
        self.bytes_received = 0
        if distributed and world > 1:
            shard_groups = [dist.new_group(list(range(r * shards, (r + 1) * shards))) for r in range(self.replicas)]
            replica_groups = [dist.new_group(list(range(s, world, shards))) for s in range(shards)]
            self.shard_group = shard_groups[self.replica_rank]
            self.replica_group = replica_groups[self.shard_rank]

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def describe(self) -> str:
        return f"{self.shards} latent shard(s) × {self.replicas} data-parallel replica(s)"

    def assert_same(self, what: str, payload: bytes, over_shards: bool = False) -> None:
        """Raises ``ValueError`` on every rank unless ``payload`` (a config, a batch…) is the same on all ranks (or
        on the ranks of this shard group): a mismatch found at the start instead of a wrong or hung run."""
        group, size = (self.shard_group, self.shards) if over_shards else (None, self.world)
        if size == 1:
            return
        digest = hashlib.sha256(payload).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(every, mine, group=group)
        differing = [i for i, h in enumerate(every) if int(h) != int(every[0])]
        if differing:
            scope = "the ranks of a latent-shard group" if over_shards else "all ranks"
            raise ValueError(
                f"{what} differs across {scope} (rank {self.rank} sees a different one from "
                f"{len(differing)} of {size}); start every rank with the same settings and data"
            )

    # collectives that are no-ops on a group of one -------------------------------------------------------------

    def sum_over_shards(self, t: Tensor) -> Tensor:
        """In-place sum over the shard group (the ranks that hold the other slices)."""
        if self.shards > 1:
            dist.all_reduce(t, group=self.shard_group)
            self.bytes_received += (self.shards - 1) * t.numel() * t.element_size()
        return t

    def sum_over_replicas(self, t: Tensor) -> Tensor:
        """In-place sum over the replica group (the ranks that hold the same slice, other data)."""
        if self.replicas > 1:
            dist.all_reduce(t, group=self.replica_group)
            self.bytes_received += (self.replicas - 1) * t.numel() * t.element_size()
        return t

    def min_over_world(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def gather_shards(self, t: Tensor) -> list[Tensor]:
        """All-gather ``t`` (same shape on every shard rank) over the shard group: one tensor per slice."""
        if self.shards == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.shards)]
        dist.all_gather(out, t.contiguous(), group=self.shard_group)
        self.bytes_received += (self.shards - 1) * t.numel() * t.element_size()
        return out

    def barrier_shards(self) -> None:
        """Waits for every rank of this shard group."""
        if self.shards > 1:
            dist.barrier(group=self.shard_group)

    def share_from_first_shard(self, action: Callable[[], str]) -> str:
        """Runs ``action`` on this shard group's first rank (slice 0) and returns its result on every rank of the
        group. If it raises there, every rank of the group raises (none is left waiting at a later collective)."""
        result: str | None = None
        error: BaseException | None = None
        if self.shard_rank == 0:
            try:
                result = action()
            except Exception as exc:  # handed to the other ranks, then raised here too
                error = exc
        if self.shards > 1:
            box: list[Any] = [result, None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=self.replica_rank * self.shards, group=self.shard_group)
            if error is None and box[1] is not None:
                raise RuntimeError(f"rank {self.replica_rank * self.shards} (latent slice 0) failed: {box[1]}")
            result = box[0]
        if error is not None:
            raise error
        assert result is not None
        return result

    def gather_slices(self, t: Tensor, dim: int, d_sae: int) -> Tensor:
        """The whole tensor from each slice's part along ``dim`` (slices may differ in size by one)."""
        if self.shards == 1:
            return t
        width = -(-d_sae // self.shards)
        pad = list(t.shape)
        pad[dim] = width - t.shape[dim]
        padded = torch.cat([t, t.new_zeros(pad)], dim=dim) if pad[dim] else t
        parts = self.gather_shards(padded)
        sizes = [stop - start for start, stop in (shard_bounds(d_sae, self.shards, s) for s in range(self.shards))]
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _reduce_from_shards(partial: Tensor, grid: ProcessGrid) -> Tensor:
    return partial if grid.shards == 1 else _ReduceFromShards.apply(partial, grid)


def _copy_to_shards(t: Tensor, grid: ProcessGrid) -> Tensor:
    return t if grid.shards == 1 else _CopyToShards.apply(t, grid)


class _ReduceFromShards(torch.autograd.Function):
    """Forward: the sum of every shard's partial. Backward: the identity (every rank computes the same loss from
    the sum, so each partial's gradient is the sum's gradient)."""

    @staticmethod
    def forward(ctx, partial: Tensor, grid: ProcessGrid) -> Tensor:
        return grid.sum_over_shards(partial.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: the identity. Backward: the sum over the shard group of each slice's partial gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, grid: ProcessGrid) -> Tensor:
        ctx.grid = grid
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.grid.sum_over_shards(grad.contiguous().clone()), None


def merge_candidates(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of each row's candidates, by value (descending) then index (ascending): exactly what one
    device's selection gives when the candidates hold every row's top-k.

    ``values, indices [N, C] -> (perm [N, k])``: the positions of the winners among the C candidates, in the
    order of the single-device selection. Indices must be unique within a row.
    """
    by_index = indices.argsort(dim=1)
    ordered = values.gather(1, by_index)
    _, perm = torch.sort(ordered, dim=1, descending=True, stable=True)
    return by_index.gather(1, perm[:, :k])


def _select_local(grid: ProcessGrid, values: Tensor, global_indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Which of this rank's candidates ``[N, c]`` are among the global top-k of their row.

    Returns ``(keep [N, c] bool, slot_order [N, k])``: the mask of this rank's winners, and for the global
    selection the position of each winner in the gathered ``[N, S·c]`` candidate list.
    """
    n, c = values.shape
    if grid.shards == 1:  # the local selection is the global one
        return torch.ones_like(values, dtype=torch.bool), torch.arange(c, device=values.device).expand(n, c)
    all_values = torch.cat(grid.gather_shards(values.detach()), dim=1)
    all_indices = torch.cat(grid.gather_shards(global_indices), dim=1)
    winners = merge_candidates(all_values, all_indices, k)
    won = torch.zeros_like(all_values, dtype=torch.bool).scatter_(1, winners, True)
    keep = won.view(n, grid.shards, c)[:, grid.shard_rank]
    return keep, winners


@dataclass(frozen=True)
class _WholeSAE:
    """What :func:`fusedsae.formats.sae_lens_config` reads of an SAE (``cfg``, ``device``), for the whole
    dictionary that no rank holds."""

    cfg: SAEConfig
    device: torch.device


@dataclass
class ShardedTrainingOutput(TrainingOutput):
    """:class:`TrainingOutput` of one slice. ``values``/``indices``/``dense_acts`` are this rank's (local latent
    indices, so :meth:`firing_counts` counts this slice); :meth:`l0` is the whole dictionary's."""

    grid: ProcessGrid | None = None

    def l0(self) -> Tensor:
        local = super().l0()
        return local if self.grid is None else self.grid.sum_over_shards(local.clone())


# Latent sharding splits the decoder's output sums and AuxK over ranks for an SAE's maths; a transcoder's target y
# and a skip path are not wired through it (yet). The Trainer refuses the same before it builds a process grid.
TRANSCODER_REFUSAL = (
    "latent sharding does not support {what} yet; train it with data parallelism only (--shard-latents 1)"
)


def transcoder_kind(cfg: SAEConfig) -> str:
    return f"transcoders (d_out={cfg.d_out})" if cfg.is_transcoder else "skip connections (skip_connection=True)"


class ShardedAutoencoder(SparseAutoencoder):
    """One slice of a latent-sharded SAE: ``W_enc [d_in, d_local]``, ``b_enc``, ``W_dec [d_local, d_in]``,
    ``threshold`` of this rank's latents ``[start, stop)``; ``b_dec [d_in]`` replicated.

    ``cfg`` is the slice's config (``d_sae = d_local``); ``full_cfg`` the dictionary's. Inference methods
    (``encode``, ``forward``…) are the slice's alone; training goes through :meth:`training_forward`, which
    communicates over the grid and returns the whole dictionary's loss. :meth:`full_state_dict` assembles the
    whole SAE; :meth:`from_full` slices one.
    """

    def __init__(self, full_cfg: SAEConfig, grid: ProcessGrid) -> None:
        start, stop = shard_bounds(full_cfg.d_sae, grid.shards, grid.shard_rank)
        if full_cfg.activation in SPARSE_ACTIVATIONS and full_cfg.k is not None and stop - start < 1:
            raise ValueError(f"d_sae={full_cfg.d_sae} is too small for {grid.shards} latent shards")
        # The slice's config: k may exceed the slice's width (each rank contributes min(k, width) candidates).
        local_k = None if full_cfg.k is None else min(full_cfg.k, stop - start)
        local_aux = min(full_cfg.aux_k, stop - start) if full_cfg.aux_k else full_cfg.aux_k
        if full_cfg.is_transcoder or full_cfg.skip_connection:
            raise ValueError(TRANSCODER_REFUSAL.format(what=transcoder_kind(full_cfg)))
        # set before the base class's __init__, which calls reset_parameters
        self.full_cfg = full_cfg
        self.grid = grid
        self.start, self.stop = start, stop
        # Matryoshka widths are the dictionary's (they cut across slices): the slice's own config has none
        super().__init__(full_cfg.replace(d_sae=stop - start, k=local_k, aux_k=local_aux, matryoshka_widths=None))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """This slice of a whole-dictionary initialisation that does not depend on the layout: latents are drawn
        in blocks of :data:`INIT_BLOCK`, block b from a generator seeded by (a draw from ``generator`` or torch's
        global RNG) + b, so S shards initialise the SAE that one process would, without ever holding all of it.
        Rows on the unit sphere, ``W_enc = W_dec^T``, biases 0 (as :meth:`SparseAutoencoder.reset_parameters`)."""
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        rows = []
        for block in range(self.start // INIT_BLOCK, -(-self.stop // INIT_BLOCK)):
            g = torch.Generator().manual_seed(base + block)
            first = block * INIT_BLOCK
            w = torch.randn(min(INIT_BLOCK, self.full_cfg.d_sae - first), self.cfg.d_in, generator=g)
            rows.append(w[max(0, self.start - first) : self.stop - first])
        w = torch.cat(rows)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @classmethod
    def from_full(cls, sae: SparseAutoencoder, grid: ProcessGrid) -> ShardedAutoencoder:
        """This rank's slice of ``sae`` (every rank passes the same whole SAE)."""
        shard = cls(sae.cfg, grid).to(sae.device)
        shard.load_full_state_dict(sae.state_dict())
        shard.check_finite = sae.check_finite
        return shard

    def slice_tensor(self, name: str, t: Tensor) -> Tensor:
        """This slice's part of the whole-dictionary tensor ``name`` (replicated tensors unchanged). Contiguous:
        the fused Adam kernel silently computes garbage on a strided optimizer state (a ``W_enc`` column slice)."""
        dim = LATENT_DIM.get(name.rsplit(".", 1)[-1])
        return t if dim is None else t.narrow(dim, self.start, self.stop - self.start).contiguous()

    def read_slices(self, path: str | os.PathLike[str], layout: Callable[[str], str]) -> dict[str, Tensor]:
        """This slice's part of every tensor of the whole-dictionary safetensors file ``path``, reading only those
        bytes (a checkpoint of a dictionary that does not fit one host). ``layout(key)`` names the parameter or
        buffer whose latent layout tensor ``key`` has (an optimizer state its parameter's). A tensor whose latent
        dimension is not this dictionary's ``d_sae`` (another SAE's file) is read whole, for the caller's config
        check to name the difference. Raises ``ValueError`` for an unreadable file."""
        from safetensors import SafetensorError, safe_open

        out = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    dim = LATENT_DIM.get(layout(key).rsplit(".", 1)[-1])
                    part = f.get_slice(key)
                    shape = part.get_shape()
                    if dim is None or len(shape) <= dim or shape[dim] != self.full_cfg.d_sae:
                        out[key] = f.get_tensor(key)
                        continue
                    index = [slice(None)] * len(shape)
                    index[dim] = slice(self.start, self.stop)
                    out[key] = part[tuple(index)].contiguous()  # contiguous: see slice_tensor
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from exc
        return out

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict({name: self.slice_tensor(name, t) for name, t in state.items()})

    def gather_tensor(self, name: str, t: Tensor) -> Tensor:
        """The whole-dictionary tensor from every slice's part (a collective over the shard group)."""
        dim = LATENT_DIM.get(name.rsplit(".", 1)[-1])
        return t if dim is None else self.grid.gather_slices(t, dim, self.full_cfg.d_sae)

    def sliced(self, name: str, t: Tensor) -> SlicedTensor:
        """This slice's part ``t`` of the whole-dictionary tensor ``name`` (a parameter, buffer or their optimizer
        state), placed for :func:`fusedsae.sharded_files.write_sliced_safetensors`; replicated and 0-dim tensors
        (``b_dec``, Adam's step) are whole."""
        dim = LATENT_DIM.get(name.rsplit(".", 1)[-1])
        if dim is None or t.dim() == 0:
            return SlicedTensor(t)
        return SlicedTensor(t, dim, self.start, self.full_cfg.d_sae)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole SAE's parameters and buffers (every shard rank must call it: it gathers)."""
        return {name: self.gather_tensor(name, t.detach()) for name, t in self.state_dict().items()}

    def full_sae(self) -> SparseAutoencoder:
        """The whole SAE as one :class:`SparseAutoencoder` (gathers; every shard rank must call it)."""
        state = self.full_state_dict()
        sae = SparseAutoencoder(self.full_cfg).to(self.device)
        sae.load_state_dict(state)
        return sae

    def save(self, path: str | os.PathLike[str], sparsity: Tensor | None = None) -> Path:
        """Writes the *whole* SAE's SAELens folder without gathering it: byte for byte what :meth:`full_sae` then
        :meth:`SparseAutoencoder.save` write, but each rank of the shard group writes its slice's bytes straight
        into ``sae_weights.safetensors`` (and ``sparsity.safetensors``), so no rank holds more than its slice
        (:mod:`fusedsae.sharded_files`). A collective: every rank of one shard group calls it (one group per
        ``path``; under data parallelism, one replica's). ``path`` must be on a filesystem all of them see.

        Args:
            path: the folder to write.
            sparsity: ``[d_local]`` this slice's log10 firing frequencies, or None.

        Atomic as the unsharded save: the files are written into a temporary folder that slice 0's rank renames
        onto ``path`` once every rank has written (and fsynced) its part; a crash leaves the old folder or the new
        one, and at worst a ``.<name>.tmp-*`` folder that the next run removes.
        """
        final = Path(path)

        def make_folder() -> str:
            final.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)

        grid, first = self.grid, self.grid.shard_rank == 0
        tmp = Path(grid.share_from_first_shard(make_folder))
        try:
            with torch.no_grad():
                tensors = {name: self.sliced(name, t) for name, t in sae_tensors(self).items()}
                write_sliced_safetensors(tmp / WEIGHTS_FILE, tensors, first)
                if sparsity is not None:
                    part = self.sliced("b_enc", sparsity.float())  # laid out as b_enc: one entry per latent
                    write_sliced_safetensors(tmp / SPARSITY_FILE, {"sparsity": part}, first)
            if first:
                write_json(tmp / CFG_FILE, sae_lens_config(_WholeSAE(self.full_cfg, self.device)))
            grid.barrier_shards()  # every part is in, and fsynced
            if first:
                replace_dir(tmp, final)
            grid.barrier_shards()  # the folder exists for every rank that returns
        except BaseException:
            if first:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the whole dictionary: the slices' squared gradient norms summed
        over the shard group, replicated parameters (``b_dec``, the same on every shard) counted once."""
        named = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if not named:
            return torch.zeros(())
        sliced = [torch.linalg.vector_norm(g).pow(2) for name, g in named if name in LATENT_DIM]
        replicated = [torch.linalg.vector_norm(g).pow(2) for name, g in named if name not in LATENT_DIM]
        local = torch.stack(sliced).sum().reshape(1) if sliced else named[0][1].new_zeros(1)
        total = self.grid.sum_over_shards(local)
        if replicated:
            total = total + torch.stack(replicated).sum()
        norm = total.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, g in named:
            g.mul_(coef.to(g.dtype))
        return norm.squeeze(0)

    # -------------------------------------------------------------------------------------------------------------
    # training
    # -------------------------------------------------------------------------------------------------------------

    def training_forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        coefficient_scale: float = 1.0,
        *,
        dead_capacity: int | None = None,
        defer_checks: bool = False,
    ) -> ShardedTrainingOutput:
        """:meth:`SparseAutoencoder.training_forward` of the whole dictionary, each rank computing its slice.

        Args:
            x: ``[..., d_in]``, the same on every rank of a shard group (each replica its own batch).
            dead_mask: ``[d_local]`` bool, this slice's dead latents (enables AuxK).
            coefficient_scale: the trainer's sparsity warm-up multiplier.
            dead_capacity: accepted for the Trainer's sake; AuxK here always considers the whole slice.
            defer_checks: count NaN/Inf inputs on the device instead of raising (as the base class).

        Every rank of the shard group returns the same loss; ``values``/``indices`` are this slice's.
        """
        del dead_capacity
        cfg, grid = self.full_cfg, self.grid
        x2 = self.flatten_input(x, check_finite=not defer_checks)
        nonfinite = (~torch.isfinite(x2)).sum() if (defer_checks and self.check_finite) else None
        b_dec_in = _copy_to_shards(self.b_dec, grid) if cfg.apply_b_dec_to_input else None
        losses: dict[str, Tensor] = {}
        values = indices = dense = None
        n_dead: int | Tensor = 0
        if cfg.activation == "topk":
            assert self.cfg.k is not None and cfg.k is not None
            code = F.topk_encode(x2, self.W_enc, self.b_enc, b_dec_in, k=self.cfg.k)
            keep, _ = _select_local(grid, code.values, code.indices + self.start, cfg.k)
            values, indices = code.values * keep, code.indices
            if cfg.matryoshka_widths:
                sae_out = self._matryoshka_levels(x2, losses, values=values, indices=indices)
            else:
                partial = F.sparse_decode(values, indices, self.W_dec, None, check_indices=False)
                sae_out = _reduce_from_shards(partial, grid) + self.b_dec
            mse = (sae_out - x2).pow(2).sum(-1).mean()
            if dead_mask is not None and cfg.aux_k:
                n_dead, losses["auxiliary_reconstruction_loss"] = self._auxk_loss(x2, b_dec_in, sae_out, dead_mask)
        elif cfg.activation == "batchtopk":
            pre = F.encode_pre(x2, self.W_enc, self.b_enc, b_dec_in)
            dense = torch.relu(pre) * self._batch_active(pre.detach(), cfg.k or 0)
            if cfg.matryoshka_widths:
                sae_out = self._matryoshka_levels(x2, losses, dense=dense)
            else:
                sae_out = _reduce_from_shards(dense @ self.W_dec, grid) + self.b_dec
            mse = (sae_out - x2).pow(2).sum(-1).mean()
            if dead_mask is not None and cfg.aux_k:  # per token among the dead latents, as for TopK
                n_dead, losses["auxiliary_reconstruction_loss"] = self._auxk_loss(x2, b_dec_in, sae_out, dead_mask)
            if self.training:
                self._update_global_threshold(dense.detach())
        else:  # relu, jumprelu: the unsharded terms, the slices' partial sums reduced over the shard group
            dense, sae_out, mse, penalty = self.dense_training_terms(
                x2, b_dec_in, coefficient_scale, lambda partial: _reduce_from_shards(partial, grid)
            )
            losses.update(penalty)
        losses = {"mse_loss": mse, **losses}
        loss = torch.stack([term.float() for term in losses.values()]).sum()
        extras = {"d_sae": self.cfg.d_sae}
        return ShardedTrainingOutput(
            loss, losses, x2, sae_out, values, indices, dense, n_dead, extras, nonfinite=nonfinite, grid=grid
        )

    def _matryoshka_levels(
        self,
        x2: Tensor,
        losses: dict[str, Tensor],
        values: Tensor | None = None,
        indices: Tensor | None = None,
        dense: Tensor | None = None,
    ) -> Tensor:
        """Matryoshka's prefix reconstructions of the whole dictionary from this slice's activations (sparse
        ``values, indices [N, m]`` with local indices, or ``dense [N, d_local]``): adds ``inner_mse_loss_<w>`` to
        ``losses`` (as :meth:`SparseAutoencoder.training_forward`) and returns the full reconstruction ``[N, d_in]``.

        A width w cuts this slice after its first ``clamp(w - start, 0, d_local)`` latents, so each rank computes
        its partial prefix sums at those cuts (``matryoshka_decode`` at the distinct non-zero cuts; zero for a
        width below the slice), and the partials ``[N, L, d_in]`` are summed over the shard group like the
        decoder's: level l is then the sum over every slice's latents below ``widths[l]``, the last level the
        ordinary reconstruction. Communication: L times one decoder reduction.
        """
        widths = self.full_cfg.matryoshka_widths
        assert widths
        cuts = [min(max(width - self.start, 0), self.cfg.d_sae) for width in widths]
        distinct = sorted({cut for cut in cuts if cut > 0})  # the last width is d_sae: its cut, d_local, is there
        if dense is not None:
            bounds = [0, *distinct]
            segments = [dense[:, a:b] @ self.W_dec[a:b] for a, b in pairwise(bounds)]
            prefixes = torch.stack(segments, 1).cumsum(1)
        else:
            assert values is not None and indices is not None
            prefixes = F.matryoshka_decode(values, indices, self.W_dec, None, distinct, check_indices=False)
        zero = prefixes.new_zeros(prefixes.shape[0], 1, prefixes.shape[2])
        # narrow, not a list index: no index tensor to copy to the device
        partial = torch.cat([prefixes.narrow(1, distinct.index(c), 1) if c else zero for c in cuts], dim=1)
        levels = _reduce_from_shards(partial, self.grid) + self.b_dec
        for width, level in zip(widths[:-1], levels.unbind(1)):
            losses[f"inner_mse_loss_{width}"] = (level - x2).pow(2).sum(-1).mean()
        return levels[:, -1]

    def _auxk_loss(
        self, x2: Tensor, b_dec_in: Tensor | None, sae_out: Tensor, dead_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """AuxK of the whole dictionary (TopK and BatchTopK alike, as :meth:`SparseAutoencoder.training_forward`):
        each token's top ``aux_k`` pre-activations among the dead latents of every slice reconstruct the detached
        residual ``x2 - sae_out``. Returns ``(n_dead, loss term)``: the global dead count (on the device) and
        ``aux_loss_coefficient`` × the normalised, scaled error.

        The live latents get a bias of -inf (never chosen over a dead one, ReLU 0, no gradient); each slice's
        candidates are merged as for TopK. Entries at 0 may tie: they add 0."""
        cfg, grid = self.full_cfg, self.grid
        assert self.cfg.aux_k
        n_dead = grid.sum_over_shards(dead_mask.sum().reshape(1))  # stays on the device
        bias = torch.where(dead_mask, self.b_enc, torch.full_like(self.b_enc, float("-inf")))
        aux_code = F.topk_encode(x2, self.W_enc, bias, b_dec_in, k=self.cfg.aux_k)
        aux_keep, _ = _select_local(grid, aux_code.values, aux_code.indices + self.start, min(cfg.aux_k, cfg.d_sae))
        aux_partial = F.sparse_decode(
            aux_code.values * aux_keep, aux_code.indices, self.W_dec, None, check_indices=False
        )
        aux_out = _reduce_from_shards(aux_partial, grid)
        residual = (x2 - sae_out).detach()
        variance = M.batch_variance(residual, grid.sum_over_replicas if grid.replicas > 1 else None)
        scale = (n_dead.to(residual.dtype) / cfg.aux_k).clamp(max=1.0)
        error = (aux_out - residual).pow(2).sum(-1).mean()
        # the small-batch rule of SparseAutoencoder.training_forward: no residual variance, no AuxK term
        live = (variance > 0) & (n_dead > 0)  # exactly 0 when nothing is dead (as the base class)
        aux = torch.where(live, scale * error / variance.clamp_min(1e-12), torch.zeros_like(error))
        return n_dead, cfg.aux_loss_coefficient * aux.squeeze(0)

    def _batch_active(self, pre: Tensor, k: int) -> Tensor:
        """BatchTopK's active set of this slice: the global ``k·N`` largest positive entries of the batch, ties by
        the lower global row-major index. ``pre [N, d_local] -> bool [N, d_local]``."""
        n = pre.shape[0]
        budget = k * n
        local = reference.batch_active(pre, budget)
        rows, cols = local.nonzero(as_tuple=True)
        count = rows.numel()
        # Pad every rank's candidate list to the budget (a static size for the all-gather): -inf never wins.
        cand_values = pre.new_full((1, budget), float("-inf"))
        cand_flat = torch.full((1, budget), -1, dtype=torch.int64, device=pre.device)
        cand_values[0, :count] = pre[rows, cols]
        cand_flat[0, :count] = rows * self.full_cfg.d_sae + cols + self.start
        # Padding (-inf, index -1) only ever ties with padding, and is dropped below if it wins.
        keep, _ = _select_local(self.grid, cand_values, cand_flat, budget)
        keep = keep[0, :count] & (cand_values[0, :count] > 0)
        active = torch.zeros_like(local)
        active[rows[keep], cols[keep]] = True
        return active

    @torch.no_grad()
    def _update_global_threshold(self, acts: Tensor) -> None:
        """BatchTopK's inference threshold from the smallest positive activation of the *global* batch."""
        positive = acts[acts > 0]
        local = positive.min() if positive.numel() else acts.new_tensor(float("inf"))
        smallest = self.grid.min_over_world(local.reshape(1).clone())
        if not torch.isfinite(smallest).all():
            return
        smallest = smallest.to(self.threshold.dtype)
        current = self.threshold[0]
        lr = self.full_cfg.topk_threshold_lr
        new = torch.where(current <= 0, smallest, (1 - lr) * current + lr * smallest)
        self.threshold.copy_(new.expand_as(self.threshold))
