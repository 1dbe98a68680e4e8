"""Several SAEs trained from one activation pass: each batch is read (from a cache, or captured from the model)
once and every SAE takes its optimizer step on it, or on its own column block of it when the batch holds several
hooks side by side. Transcoders train the same way on pair data (each trainer reads the whole row ``[x | y]``).

Each SAE keeps its own :class:`~fusedsae.training.Trainer`, running its own unchanged ``train()`` loop:
optimizer, run folder, log, checkpoints, dead-latent counters, and its own RNG state (swapped in around its
steps). The loops run in threads that take turns — exactly one runs at any moment, in a fixed round-robin order,
handing over whenever a trainer asks for its next batch — so nothing runs concurrently and the result is what
training each SAE alone on the same batches gives, bit for bit on the CPU (tested). The first trainer to ask for
batch ``s`` reads it from the shared source; the others get the same tensor. A trainer checkpoints the shared
source's position, which at every checkpoint equals the batches it has consumed, as when it trains alone;
:meth:`MultiTrainer.resume` restarts all trainers from the newest step they all have.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fusedsae import checkpoint as ckpt
from fusedsae.training import Trainer


class _Aborted(Exception):
    """Raised in the waiting trainers when another one failed, so that their loops unwind (and release locks)."""


class SharedView:
    """What one trainer of a :class:`MultiTrainer` reads: its width (``columns`` ``(lo, hi)`` of each shared batch,
    None: all of it), the shared position for its checkpoints, and ``info`` (its hook) for its SAE's metadata."""

    def __init__(self, source: Any, columns: tuple[int, int] | None = None, info: dict[str, Any] | None = None) -> None:
        self.source = source
        self.columns = columns
        self.info = dict(info or {})
        self.batch_size = source.batch_size
        self.d_in = int(source.d_in) if columns is None else columns[1] - columns[0]
        # transcoder pairs: every trainer reads the whole row [x | y] (pair data have one input hook, so no columns)
        self.d_out = getattr(source, "d_out", None) if columns is None else None
        self.n_heads = getattr(source, "n_heads", None)
        self.ground_truth = getattr(source, "ground_truth", None)
        self.driver: MultiTrainer | None = None
        self.index = 0

    def take(self, batch: Tensor) -> Tensor:
        """This trainer's part of a shared batch, contiguous (as a source of that width alone would give it)."""
        if self.columns is None:
            return batch
        return batch[:, self.columns[0] : self.columns[1]].contiguous()

    def next_batch(self) -> Tensor:
        if self.driver is None:
            raise RuntimeError("a SharedView gets its batches through MultiTrainer.train()")
        return self.take(self.driver.batch_for(self.index))

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """The source's description, narrowed to this view's hook (``info``) when the batch holds several."""
        info = self.source.describe() if hasattr(self.source, "describe") else {}
        if self.columns is not None:
            info = {k: v for k, v in info.items() if k not in ("hooks", "widths", "layer")}
            info["columns"] = list(self.columns)
        return {**info, **self.info}


class MultiTrainer:
    """Trains ``trainers`` together on the batches of ``source``.

    Build each trainer on ``SharedView(source, columns)`` (``columns`` picks its hook's block of a multi-hook batch;
    None: the whole batch), one view per trainer. All trainers must run the same number of steps.
    """

    def __init__(self, trainers: Sequence[Trainer], source: Any) -> None:
        if not trainers:
            raise ValueError("MultiTrainer needs at least one trainer")
        views = [t.data for t in trainers]
        if not all(isinstance(v, SharedView) and v.source is source for v in views):
            raise ValueError("each trainer of a MultiTrainer must read SharedView(source) of the shared source")
        if len({id(v) for v in views}) != len(views):
            raise ValueError("each trainer of a MultiTrainer needs its own SharedView")
        totals = {t.cfg.total_steps(t.world_size) for t in trainers}
        if len(totals) != 1:
            raise ValueError(f"SAEs trained together must run the same number of steps, got {sorted(totals)}")
        dirs = [str(t.run_dir) for t in trainers if t.run_dir is not None]
        if len(set(dirs)) != len(dirs):
            raise ValueError("SAEs trained together need one run folder each")
        self.trainers = list(trainers)
        self.source = source
        for i, view in enumerate(views):
            view.driver, view.index = self, i
        self._rng = [ckpt.rng_state() for _ in trainers]
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False] * len(trainers)
        self._error: BaseException | None = None
        self._requests = [0] * len(trainers)
        self._batch: tuple[int, Tensor] | None = None

    def resume(self) -> int | None:
        """Restores every trainer from the newest checkpoint step that all of them have (intact); returns the step,
        or None when some trainer has none (then nothing is restored and training starts from scratch)."""
        common: set[int] | None = None
        for t in self.trainers:
            if t.run_dir is None:
                raise ValueError("resume needs a run_dir for every trainer")
            steps = {int(p.name.removeprefix("step-")) for p in ckpt.list_checkpoints(t.run_dir)}
            common = steps if common is None else common & steps
        if not common:
            return None
        step = max(common)
        for i, t in enumerate(self.trainers):
            t.resume(ckpt.checkpoint_root(t.run_dir) / f"step-{step:09d}")
            self._rng[i] = ckpt.rng_state()
        self._requests = [t.step for t in self.trainers]
        return step

    # -- taking turns ------------------------------------------------------------------------------------------

    def _wait_turn(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == i or self._error is not None)
            if self._error is not None:
                raise _Aborted
        ckpt.set_rng_state(self._rng[i])

    def _pass_turn(self, i: int) -> None:
        self._rng[i] = ckpt.rng_state()
        with self._cond:
            n = len(self.trainers)
            nxt = next(((i + j) % n for j in range(1, n + 1) if not self._done[(i + j) % n]), i)
            self._turn = nxt
            self._cond.notify_all()

    def batch_for(self, i: int) -> Tensor:
        """Trainer ``i``'s next batch: its turn ends here, and once every other trainer has taken its own step the
        batch is read from the source (by the first trainer to ask) or shared."""
        self._pass_turn(i)
        self._wait_turn(i)
        request = self._requests[i]
        self._requests[i] += 1
        if self._batch is None or self._batch[0] != request:
            self._batch = (request, self.source.next_batch())
        return self._batch[1]

    def _run(self, i: int, threads: int, results: list[Any]) -> None:
        torch.set_num_threads(threads)  # a new thread must split CPU work as the caller does, for bitwise equality
        try:
            self._wait_turn(i)
            results[i] = self.trainers[i].train()
        except _Aborted:
            return
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
            return
        with self._cond:
            self._done[i] = True
        self._pass_turn(i)

    def train(self) -> list[dict[str, Any]]:
        """Trains all SAEs to the end (each trainer's ``cfg.progress`` decides whether it shows a bar); returns each
        one's last metrics, or raises the first error of any trainer (the others stop at their next batch)."""
        results: list[Any] = [None] * len(self.trainers)
        saved = ckpt.rng_state()
        self._turn, self._done, self._error = 0, [False] * len(self.trainers), None
        threads = [
            # daemon: an interrupted caller must not wait for trainers that wait for their turn
            threading.Thread(
                target=self._run, args=(i, torch.get_num_threads(), results), name=f"fusedsae-sae{i}", daemon=True
            )
            for i in range(len(self.trainers))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ckpt.set_rng_state(saved)
        if self._error is not None:
            raise self._error
        return results


# ---------------------------------------------------------------------------------------------------------------
# `fusedsae train` with several hooks and/or a sweep
# ---------------------------------------------------------------------------------------------------------------


def plan_runs(settings: dict[str, Any], source: Any) -> list[dict[str, Any]]:
    """One entry per SAE of a multi-SAE ``fusedsae train``: ``name`` (its run folder under ``--out``), ``d_sae``
    (None: the default for its width), ``k``, ``columns`` of the shared batch and ``info`` (its hook) — every hook
    of the data times every ``--d-sae`` times every ``--k`` (k only for TopK and BatchTopK)."""
    info = source.describe() if hasattr(source, "describe") else {}
    hooks: list[dict[str, Any] | None] = list(info.get("hooks") or [None])
    widths = list(info.get("widths") or [int(source.d_in)])
    layers = info.get("layer") if isinstance(info.get("layer"), list) else None
    d_saes = settings["d_sae"] if isinstance(settings["d_sae"], list) else [settings["d_sae"]]
    ks = settings["k"] if isinstance(settings["k"], list) else [settings["k"]]
    if settings["activation"] not in ("topk", "batchtopk"):
        ks = ks[:1]
    runs = []
    lo = 0
    for i, (hook, width) in enumerate(zip(hooks, widths)):
        columns = (lo, lo + width) if hook is not None else None
        lo += width
        label = f"layer{layers[i]}" if layers else f"hook{i}"
        hook_info: dict[str, Any] = {}
        if hook is not None:
            hook_info = {"hook": hook, **({"layer": layers[i]} if layers else {})}
        for d_sae in d_saes:
            for k in ks:
                parts = [label] if hook is not None else []
                parts += [f"d{d_sae}"] if len(d_saes) > 1 else []
                parts += [f"k{k}"] if len(ks) > 1 else []
                runs.append({"name": "-".join(parts), "d_sae": d_sae, "k": k, "columns": columns, "info": hook_info})
    return runs


def train_from_cli(args: Any, settings: dict[str, Any], source: Any, device: str, rank: int, world: int) -> bool:
    """``fusedsae train`` for several SAEs from one pass: one run folder per SAE under ``--out``, trained by a
    :class:`MultiTrainer`; ``--resume`` restarts all of them from their newest common checkpoint."""
    import json
    import time
    from pathlib import Path

    from fusedsae import plots
    from fusedsae.cli import RUN_CONFIG, add_periodic_evals, make_trainer

    out = Path(settings["out"])
    runs = plan_runs(settings, source)
    trainers = []
    for i, run in enumerate(runs):
        view = SharedView(source, run["columns"], run["info"])
        # each SAE's folder is its own run (its own run id; a resume adopts the checkpoint's)
        one = {**settings, "d_sae": run["d_sae"], "k": run["k"], "run_id": None}
        # one progress bar: the first SAE's (they all step together)
        progress = i == 0 and rank == 0 and not args.no_progress
        trainers.append(make_trainer(one, view, out / run["name"], device, world, progress, args.overwrite))
    driver = MultiTrainer(trainers, source)
    try:
        step = driver.resume() if args.resume else None
        for t in trainers:
            if step is None:
                t.start_run()  # locks each folder; refuses one holding another run (unless --overwrite)
        if rank == 0:
            from fusedsae.formats import atomic_write

            atomic_write(out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")
            if args.resume:
                print(f"resumed {len(trainers)} SAEs at step {step}" if step is not None else "no checkpoint; new run")
            add_periodic_evals(trainers, settings, device)
        start = time.perf_counter()
        step0 = trainers[0].step
        results = driver.train()
    except BaseException:
        for t in trainers:
            t.close()  # the folders locked before the failure (train() releases its own)
        raise  # a run folder, checkpoint or divergence error is one line (fusedsae.cli.main)
    seconds = time.perf_counter() - start
    if rank != 0:
        return True
    tokens = (trainers[0].step - step0) * settings["batch_size"] * world
    print(
        f"\n{len(trainers)} SAEs from one pass: {tokens:,} tokens each in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s per SAE, {len(trainers) * tokens / max(seconds, 1e-9):,.0f} "
        f"SAE-tokens/s); data={settings['data']}, device={device}, world={world}"
    )
    for t, metrics in zip(trainers, results):
        cfg = t.sae.cfg
        k = f", k={cfg.k}" if cfg.k else ""
        kind = "SAE" if cfg.d_out is None else ("skip-transcoder" if cfg.skip_connection else "transcoder")
        d_out = f", d_out={cfg.d_out}" if cfg.d_out is not None else ""
        print(f"\n{t.run_dir}: {cfg.activation} {kind}, d_in={cfg.d_in}{d_out}, d_sae={cfg.d_sae}{k}")
        print(plots.results_table(metrics))
        if not args.no_plots:
            curves = plots.read_metrics(t.run_dir / "metrics.jsonl")
            plots.plot_training_curves(curves, t.run_dir / "training_curves.png")
    print(f"\nSAEs (SAELens folders): {', '.join(str(t.run_dir / 'sae') for t in trainers)}")
    return True
