"""Several SAEs trained from one activation pass: each batch is read (from a cache, or captured from the model)
once and every SAE takes its optimizer step on it, or on its own column block of it when the batch holds several
hooks side by side.

Each SAE keeps its own :class:`~fusedsae.training.Trainer`: optimizer, run folder, log, checkpoints, dead-latent
counters and RNG state (swapped in around its steps), so the result is what training it alone on the same batches
gives, bit for bit on the CPU (tested). The data position is the shared source's; every trainer checkpoints it at
the same steps, and :meth:`MultiTrainer.resume` restarts all of them from the newest step they all have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from fusedsae import checkpoint as ckpt
from fusedsae.training import Trainer


class SharedView:
    """What one trainer of a :class:`MultiTrainer` sees of the shared source: its width (``columns`` ``(lo, hi)``
    of each batch, None: all), and the shared position for its checkpoints. The driver reads the batches."""

    def __init__(self, source: Any, columns: tuple[int, int] | None = None, info: dict[str, Any] | None = None) -> None:
        self.source = source
        self.columns = columns
        self.info = dict(info or {})
        self.batch_size = source.batch_size
        self.d_in = int(source.d_in) if columns is None else columns[1] - columns[0]
        self.n_heads = getattr(source, "n_heads", None)
        self.ground_truth = getattr(source, "ground_truth", None)

    def take(self, batch: Tensor) -> Tensor:
        """This trainer's part of a shared batch, contiguous (as a source of that width alone would give it)."""
        if self.columns is None:
            return batch
        return batch[:, self.columns[0] : self.columns[1]].contiguous()

    def next_batch(self) -> Tensor:
        raise RuntimeError("a trainer of a MultiTrainer gets its batches from the driver; call MultiTrainer.train()")

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
    """Steps ``trainers`` together on the batches of ``source``.

    Build each trainer on ``SharedView(source, columns)`` (``columns`` picks its hook's block of a multi-hook batch;
    None: the whole batch). All trainers must run the same number of steps on the same batch size.
    """

    def __init__(self, trainers: Sequence[Trainer], source: Any) -> None:
        if not trainers:
            raise ValueError("MultiTrainer needs at least one trainer")
        for t in trainers:
            if not isinstance(t.data, SharedView) or t.data.source is not source:
                raise ValueError("each trainer of a MultiTrainer must read SharedView(source) of the shared source")
        totals = {t.cfg.total_steps(t.world_size) for t in trainers}
        if len(totals) != 1:
            raise ValueError(f"SAEs trained together must run the same number of steps, got {sorted(totals)}")
        dirs = [str(t.run_dir) for t in trainers if t.run_dir is not None]
        if len(set(dirs)) != len(dirs):
            raise ValueError("SAEs trained together need one run folder each")
        self.trainers = list(trainers)
        self.source = source
        self._rng: list[dict[str, Tensor]] = []

    def resume(self) -> int | None:
        """Restores every trainer from the newest checkpoint step that all of them have (intact); returns the step,
        or None when some trainer has none (then nothing is restored and training starts from scratch)."""
        common: set[int] | None = None
        for t in self.trainers:
            if t.run_dir is None:
                raise ValueError("resume needs a run_dir for every trainer")
            ckpt.remove_partial(t.run_dir)
            steps = {int(p.name.removeprefix("step-")) for p in ckpt.list_checkpoints(t.run_dir)}
            common = steps if common is None else common & steps
        if not common:
            return None
        step = max(common)
        for t in self.trainers:
            t.resume(ckpt.checkpoint_root(t.run_dir) / f"step-{step:09d}")
            self._rng.append(ckpt.rng_state())
        return step

    def train(self, progress: bool = False) -> list[dict[str, Any]]:
        """Trains all SAEs to the end (a progress bar with ``progress``); returns each one's last metrics."""
        resumed = len(self._rng) == len(self.trainers)
        total = 0
        states = []
        for i, t in enumerate(self.trainers):
            if resumed:
                ckpt.set_rng_state(self._rng[i])
            total = t.begin()
            states.append(ckpt.rng_state())
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.trainers[0].step, unit="step", dynamic_ncols=True)
        try:
            while self.trainers[0].step < total:
                batch = self.source.next_batch()
                for i, t in enumerate(self.trainers):
                    ckpt.set_rng_state(states[i])
                    t.advance(t.data.take(batch))
                    states[i] = ckpt.rng_state()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        results = []
        for i, t in enumerate(self.trainers):
            ckpt.set_rng_state(states[i])
            results.append(t.end())
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
    from fusedsae.cli import RUN_CONFIG, add_periodic_evals, default_d_sae, make_trainer
    from fusedsae.evals import EVAL_FILE

    out = Path(settings["out"])
    runs = plan_runs(settings, source)
    trainers = []
    for run in runs:
        view = SharedView(source, run["columns"], run["info"])
        d_sae = run["d_sae"] or default_d_sae(settings, view)
        one = {**settings, "d_sae": d_sae, "k": run["k"]}
        trainers.append(make_trainer(one, view, out / run["name"], device, world, progress=False))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    driver = MultiTrainer(trainers, source)
    if args.resume:
        step = driver.resume()
        if rank == 0:
            print(f"resumed {len(trainers)} SAEs at step {step}" if step is not None else "no checkpoint; a new run")
    elif rank == 0:
        for t in trainers:
            t.run_dir.mkdir(parents=True, exist_ok=True)
            (t.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (t.run_dir / EVAL_FILE).unlink(missing_ok=True)
    if rank == 0:
        add_periodic_evals(trainers, settings, device)
    start = time.perf_counter()
    step0 = trainers[0].step
    results = driver.train(progress=not args.no_progress and rank == 0)
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
        print(f"\n{t.run_dir}: {cfg.activation} SAE, d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}")
        print(plots.results_table(metrics))
        if not args.no_plots:
            curves = plots.read_metrics(t.run_dir / "metrics.jsonl")
            plots.plot_training_curves(curves, t.run_dir / "training_curves.png")
    print(f"\nSAEs (SAELens folders): {', '.join(str(t.run_dir / 'sae') for t in trainers)}")
    return True
