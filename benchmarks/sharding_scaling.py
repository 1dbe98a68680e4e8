"""Latent-sharding scaling: a measurement, not a test.

For 1, 2 and 4 ranks (gloo on the CPU; NCCL when run on GPUs) it times the Trainer's TopK step (AuxK on at its
default width with a fifth of the latents dead, normalised decoder, Adam) of one dictionary split over the ranks,
and reports tokens/s (per rank and in all), the bytes each rank's collectives brought in per step — measured by
:class:`fusedsae.sharding.ProcessGrid` and by formula — and the training-state memory per rank with the largest
``d_sae`` that fits a given memory per rank. It also times the sharded code path with a world of one against the
plain SAE (the overhead of going through it).

It also times saving the SAELens folder of the whole dictionary both ways, with each rank's peak extra memory
during the save (host RSS sampled every millisecond on the CPU; ``max_memory_allocated`` on a GPU): ``sliced``,
each rank writing its slice into the shared files (:meth:`fusedsae.sharding.ShardedAutoencoder.save`, what the
Trainer does), and ``gathered``, the previous path (every rank all-gathers the SAE, rank 0 writes it); and the same
for a training checkpoint (the SAE, Adam's moments and the counters: ``Trainer.save_checkpoint`` against the gathered
``Trainer.state_contents()`` written by rank 0).

    python benchmarks/sharding_scaling.py                       # CPU, writes benchmarks/results/sharding-*.{json,md}
    python benchmarks/sharding_scaling.py --d-sae 65536 --ranks 1 2 4 8 --device cuda   # on a GPU machine

Per step, each rank receives ``(S−1)·N·k_local·(value bytes + 8)`` for the TopK candidates (index int64), the same
for AuxK's ``aux_k`` candidates, and ``(S−1)·N·d_in·value bytes`` for each of the two decoder all-reduces (TopK and
AuxK), plus ``(S−1)·d_in`` for b_dec's encoder gradient and a few scalars.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class PeakMemory:
    """Peak memory above the level at entry while the block runs, in bytes: the process's resident set sampled
    every millisecond on the CPU (the page cache that file writes fill is not counted), allocated memory on a GPU."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        # hand memory freed by the previous measurement back to the OS first, or a later one reusing it reads as 0
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.rss()
        self.top, self.running = self.base, True

        def sample() -> None:
            while self.running:
                self.top = max(self.top, self.rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.top, self.rss()) - self.base


def time_saves(model, x, distributed: bool, device: str, folder: Path) -> dict[str, dict[str, float]]:
    """Saves ``model``'s whole SAE, then a training checkpoint after one step on ``x``, both ways into ``folder``:
    seconds and peak extra memory on this rank."""
    import torch.distributed as dist

    import fusedsae
    from fusedsae import checkpoint as ckpt

    out = {}
    for way in ("sliced", "gathered"):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            if way == "sliced":
                model.save(folder / way)
            else:
                whole = model.full_sae()  # a collective
                if not distributed or dist.get_rank() == 0:
                    whole.save(folder / way)
                del whole
            if distributed:
                dist.barrier()
        out[way] = {"seconds": time.perf_counter() - start, "peak_extra_bytes": memory.peak}
    cfg = fusedsae.TrainConfig(steps=1, batch_size=x.shape[0], progress=False, run_dir=str(folder / "run"))
    trainer = fusedsae.Trainer(model, x, cfg)
    trainer.train_step(x)  # Adam's moments exist from here
    for way in ("checkpoint-sliced", "checkpoint-gathered"):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            if way == "checkpoint-sliced":
                trainer.save_checkpoint()
            else:
                contents = trainer.state_contents()  # a collective
                if not distributed or dist.get_rank() == 0:
                    ckpt.write_checkpoint(folder / "gathered-run", trainer.step, contents, run_id=trainer.run_id)
                del contents
            if distributed:
                dist.barrier()
        out[way] = {"seconds": time.perf_counter() - start, "peak_extra_bytes": memory.peak}
    trainer.close()
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank of a timed run (under torchrun) or the world-of-one comparison (no torchrun)."""
    import torch.distributed as dist

    import fusedsae
    from fusedsae.sharding import ProcessGrid, ShardedAutoencoder

    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu"
    grid = ProcessGrid(dist.get_world_size() if distributed else 1)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(
        d_in=args.d_in, d_sae=args.d_sae, activation="topk", k=args.k, dtype=args.dtype, device=device
    )
    x = torch.randn(args.batch, args.d_in, device=device, dtype=sae.dtype)
    dead = torch.arange(args.d_sae, device=device) % 5 == 0  # a fifth of the latents dead: AuxK works every step
    rows = {}
    variants = [("sharded", True)] if distributed else [("plain", False), ("sharded-world-1", True)]
    for name, sharded in variants:
        model = ShardedAutoencoder.from_full(sae, grid) if sharded else sae
        mask = model.slice_tensor("b_enc", dead) if sharded else dead
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, mask=mask, opt=opt):
            out = model.training_forward(x, dead_mask=mask)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            model.remove_parallel_decoder_grad()
            opt.step()
            model.normalize_decoder_rows()

        for _ in range(args.warmup):
            step()
        if distributed:
            dist.barrier()
        before = grid.bytes_received
        times = []
        for _ in range(args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        times.sort()
        rows[name] = {
            "median_step_s": times[len(times) // 2],
            "bytes_per_step": (grid.bytes_received - before) / args.steps,
            "params_per_rank": sum(p.numel() for p in model.parameters()),
        }
    # the save of the whole dictionary (shared folder: every rank writes into it); the largest rank's memory counts
    folder = Path(args.out).parent / ".sharding-save"
    if not distributed or dist.get_rank() == 0:
        folder.mkdir(exist_ok=True)
    if distributed:
        dist.barrier()
    saves = time_saves(ShardedAutoencoder.from_full(sae, grid), x, distributed, args.device, folder)
    if distributed:
        for way in saves.values():
            peak = torch.tensor([float(way["peak_extra_bytes"])])
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            way["peak_extra_bytes"] = float(peak)
    rows["save"] = saves
    rows["dictionary_bytes"] = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    if not distributed or dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        Path(args.out).write_text(json.dumps(rows))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def formula_bytes(args: argparse.Namespace, shards: int) -> float:
    if shards == 1:
        return 0.0
    value = torch.finfo(getattr(torch, args.dtype)).bits // 8
    width = args.d_sae // shards
    aux_k = args.d_in // 2
    candidates = args.batch * (min(args.k, width) + min(aux_k, width)) * (value + 8)
    decoder = 2 * args.batch * args.d_in * value
    return (shards - 1) * (candidates + decoder + args.d_in * value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-per-rank-gb", type=float, default=80.0, help="for the largest-d_sae column (H100: 80)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": str(args.threads)}
    common = [f"--d-in={args.d_in}", f"--d-sae={args.d_sae}", f"--k={args.k}", f"--batch={args.batch}"]
    common += [f"--dtype={args.dtype}", f"--device={args.device}", f"--threads={args.threads}"]
    common += [f"--steps={args.steps}", f"--warmup={args.warmup}", "--worker"]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tmp = RESULTS / f".sharding-tmp-{os.getpid()}" / "rows.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, *common, f"--out={tmp}"], env=env, check=True)
    single = json.loads(tmp.read_text())
    rows = []
    for n in args.ranks:
        if n == 1:
            measured, saves = single["sharded-world-1"], single["save"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__]
            subprocess.run([*cmd, *common, f"--out={tmp}"], env=env, check=True)
            result = json.loads(tmp.read_text())
            measured, saves = result["sharded"], result["save"]
        step = measured["median_step_s"]
        # fp32 training state per latent: W_enc column + W_dec row, each with its gradient and two Adam moments
        state_per_latent = 2 * args.d_in * 4 * 4
        rows.append(
            {
                "ranks": n,
                "step_ms": 1e3 * step,
                "tokens_per_s": args.batch / step,
                "tokens_per_s_per_rank": args.batch / step / n,
                "bytes_per_step_measured": measured["bytes_per_step"],
                "bytes_per_step_formula": formula_bytes(args, n),
                "state_bytes_per_rank": measured["params_per_rank"] * 16,
                "max_d_sae": int(n * args.memory_per_rank_gb * 1e9 / state_per_latent),
                "save_sliced_s": saves["sliced"]["seconds"],
                "save_sliced_peak_bytes": saves["sliced"]["peak_extra_bytes"],
                "save_gathered_s": saves["gathered"]["seconds"],
                "save_gathered_peak_bytes": saves["gathered"]["peak_extra_bytes"],
                **{
                    f"checkpoint_{way}_{key}": saves[f"checkpoint-{way}"][field]
                    for way in ("sliced", "gathered")
                    for key, field in (("s", "seconds"), ("peak_bytes", "peak_extra_bytes"))
                },
            }
        )
    tmp.unlink(missing_ok=True)
    tmp.parent.rmdir()
    overhead = single["sharded-world-1"]["median_step_s"] / single["plain"]["median_step_s"] - 1
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {k: getattr(args, k) for k in ("d_in", "d_sae", "k", "batch", "dtype", "threads")},
        "world_of_one_overhead": overhead,
        "dictionary_bytes": single["dictionary_bytes"],
        # other processes sharing the CPU slow every row: the 1-minute load average before and after the runs
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }
    name = f"sharding-{args.device}-{meta['commit']}-d{args.d_sae}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Latent sharding scaling ({meta['device']}, torch {meta['torch']}, commit {meta['commit']})",
        "",
        f"TopK step with AuxK (a fifth of the latents dead), d_in={args.d_in}, d_sae={args.d_sae}, k={args.k}, "
        f"batch {args.batch}, {args.dtype}, {args.threads} thread(s) per rank. The sharded path with a world of one "
        f"costs {100 * overhead:+.1f}% against the plain SAE. Load average before/after: "
        + " / ".join("?" if v is None else f"{v:.1f}" for v in meta["load_average"])
        + " (other work on the same cores slows every row).",
        "",
        "| ranks | step (ms) | tokens/s | tokens/s per rank | received/step (measured) | (formula) | "
        f"state/rank | largest d_sae at {args.memory_per_rank_gb:g} GB/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_rank']:.0f} | "
            f"{r['bytes_per_step_measured'] / 1e6:.2f} MB | {r['bytes_per_step_formula'] / 1e6:.2f} MB | "
            f"{r['state_bytes_per_rank'] / 1e6:.0f} MB | {r['max_d_sae']:,} |"
        )
    lines += [
        "",
        f"Saving the SAELens folder of the whole dictionary ({single['dictionary_bytes'] / 1e6:.0f} MB of tensors), "
        "then a training checkpoint (about 3x that: Adam's two moments): seconds, and the largest peak extra memory "
        "of any rank during the save.",
        "",
        "| ranks | sliced save (s) | peak extra/rank | gathered save (s) | peak extra/rank | "
        "checkpoint sliced (s) | peak extra/rank | checkpoint gathered (s) | peak extra/rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['save_sliced_s']:.2f} | {r['save_sliced_peak_bytes'] / 1e6:.1f} MB | "
            f"{r['save_gathered_s']:.2f} | {r['save_gathered_peak_bytes'] / 1e6:.1f} MB | "
            f"{r['checkpoint_sliced_s']:.2f} | {r['checkpoint_sliced_peak_bytes'] / 1e6:.1f} MB | "
            f"{r['checkpoint_gathered_s']:.2f} | {r['checkpoint_gathered_peak_bytes'] / 1e6:.1f} MB |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
