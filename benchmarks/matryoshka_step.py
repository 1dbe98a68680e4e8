"""Matryoshka step cost: a measurement, not a test.

Times the Trainer's step (AuxK at its default width with a fifth of the latents dead, normalised decoder, Adam) of
a TopK SAE and of the same SAE with five nested Matryoshka widths, side by side in one process, and reports the
ratio (target on a GPU: <= 1.15x). With dictionary_learning or SAELens installed it would time their Matryoshka
steps too; neither is installed here, so they are not measured.

    python benchmarks/matryoshka_step.py                        # CPU, 2 threads
    python benchmarks/matryoshka_step.py --device cuda --d-in 768 --d-sae 32768 --k 32 --batch 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import fusedsae

ROOT = Path(__file__).resolve().parent.parent


def time_step(sae: fusedsae.SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, rounds: int, warmup: int) -> float:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        out = sae.training_forward(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder_rows()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--activation", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--levels", type=int, default=5, help="nested widths (geometric, the last = d_sae)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/matryoshka-<device>-<commit>.*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    widths = [args.d_sae >> (2 * (args.levels - 1 - i)) for i in range(args.levels)]  # d_sae/256 … d_sae
    common = {"d_in": args.d_in, "d_sae": args.d_sae, "activation": args.activation, "k": args.k}
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    dead = torch.arange(args.d_sae, device=args.device) % 5 == 0
    rows = {}
    for name, extra in (("plain", {}), ("matryoshka", {"matryoshka_widths": widths})):
        sae = fusedsae.SparseAutoencoder(**common, **extra, device=args.device)
        rows[name] = time_step(sae, x, dead, args.rounds, args.warmup)
    ratio = rows["matryoshka"] / rows["plain"]
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores, {args.threads} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {**common, "batch": args.batch, "widths": widths},
    }
    text = (
        f"{args.activation} step, d_in={args.d_in}, d_sae={args.d_sae}, k={args.k}, batch {args.batch}, AuxK on "
        f"(a fifth dead), on {meta['device']}: plain {1e3 * rows['plain']:.1f} ms, Matryoshka with widths {widths} "
        f"{1e3 * rows['matryoshka']:.1f} ms: {ratio:.2f}x"
    )
    print(text)
    if args.save:
        name = f"matryoshka-{args.device}-{meta['commit']}"
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "step_s": rows, "ratio": ratio}
        (results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (results / f"{name}.md").write_text(f"# Matryoshka step vs plain ({meta['commit']})\n\n{text}\n")


if __name__ == "__main__":
    main()
