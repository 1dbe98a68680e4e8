"""Matryoshka step cost: a measurement, not a test.

Times the Trainer's step (AuxK at its default width with a fifth of the latents dead, normalised decoder, Adam) of
a TopK SAE and of the same SAE with five nested Matryoshka widths, side by side in one process, and reports the
ratio (target on a GPU: <= 1.15x). Then, on the same code, the Matryoshka decoder and loss alone, forward and
backward: the fused op ``fusedsae.functional.matryoshka_decode_loss`` (no ``[N, L, d]`` prefixes) against the
path it replaced (``matryoshka_decode``'s prefixes, the L losses in PyTorch, autograd through ``embedding_bag``),
with the backend the device gets (the reference on the CPU; :func:`time_decode_loss`). Where SAELens (>= 6.15) and
dictionary_learning are installed, their Matryoshka BatchTopK steps at the same shape and widths are timed too
(:func:`peer_steps`); an absent one is named and skipped.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    return median_seconds(step, rounds, warmup, x.is_cuda)


def median_seconds(step: Callable[[], None], rounds: int, warmup: int, cuda: bool) -> float:
    """The median wall time of ``step()`` over ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_decode_loss(sae: fusedsae.SparseAutoencoder, x: torch.Tensor, rounds: int, warmup: int) -> dict[str, Any]:
    """Median seconds of the Matryoshka decoder + loss forward and backward, fused and as before, on the SAE's own
    code for ``x`` (the encoder runs once, outside the timing), and the backend that ran the fused op."""
    widths = sae.cfg.matryoshka_widths
    assert widths is not None
    with torch.no_grad():
        code = fusedsae.functional.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k=sae.cfg.k)
    values = code.values.detach().requires_grad_()
    W_dec, b_dec = sae.W_dec, sae.b_dec

    def fused() -> None:
        _, sq = fusedsae.functional.matryoshka_decode_loss(values, code.indices, W_dec, b_dec, x, widths)
        sq.mean(0).sum().backward()

    def unfused() -> None:
        prefixes = fusedsae.functional.matryoshka_decode(values, code.indices, W_dec, b_dec, widths)
        (prefixes - x[:, None]).pow(2).sum(-1).mean(0).sum().backward()

    return {
        "backend": fusedsae.backends.chosen("matryoshka_decode_loss", values, code.indices, W_dec, b_dec, x, widths),
        "fused": median_seconds(fused, rounds, warmup, x.is_cuda),
        "unfused": median_seconds(unfused, rounds, warmup, x.is_cuda),
    }


def peer_steps(
    x: torch.Tensor, dead: torch.Tensor, d_sae: int, k: int, widths: list[int], rounds: int, warmup: int
) -> dict[str, float | str]:
    """The peers' Matryoshka BatchTopK training steps on ``x [batch, d_in]`` (forward, backward, their optimizer
    step), seconds per step by peer; a peer that is not installed maps to the reason, a string.

    * ``sae_lens``: ``MatryoshkaBatchTopKTrainingSAE.training_forward_pass`` (SAELens's defaults: decoder-norm
      rescaling, AuxK over ``dead``) + backward + Adam.
    * ``dictionary_learning``: ``MatryoshkaBatchTopKTrainer.update`` (group fractions = our widths' increments,
      equal group weights as its default; AuxK, gradient projection, clipping and renormalisation included).
    """
    out: dict[str, float | str] = {}
    cuda = x.is_cuda
    try:
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as exc:
        out["sae_lens"] = f"not installed ({exc.name or exc})"
    else:
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=d_sae, k=k, matryoshka_widths=list(widths), device=str(x.device)
        )
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def sae_lens_step() -> None:
            loss = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["sae_lens"] = median_seconds(sae_lens_step, rounds, warmup, cuda)
    try:
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    except ImportError as exc:
        out["dictionary_learning"] = f"not installed ({exc.name or exc})"
    else:
        sizes = [b - a for a, b in zip([0, *widths[:-1]], widths)]
        trainer = MatryoshkaBatchTopKTrainer(
            steps=10**6,
            activation_dim=x.shape[1],
            dict_size=d_sae,
            k=k,
            layer=0,
            lm_name="benchmark",
            group_fractions=[size / d_sae for size in sizes],
            device=str(x.device),
        )
        counter = iter(range(10**9))
        out["dictionary_learning"] = median_seconds(lambda: trainer.update(next(counter), x), rounds, warmup, cuda)
    return out


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
    decode_loss = time_decode_loss(sae, x, args.rounds, args.warmup)
    decode_ratio = decode_loss["unfused"] / decode_loss["fused"]
    backend = decode_loss.pop("backend")
    peers = peer_steps(x, dead, args.d_sae, args.k, widths, args.rounds, args.warmup)
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
        f"{1e3 * rows['matryoshka']:.1f} ms: {ratio:.2f}x. Matryoshka decoder + loss, forward and backward "
        f"({backend} backend): fused {1e3 * decode_loss['fused']:.1f} ms, as before (every prefix, losses in "
        f"PyTorch) {1e3 * decode_loss['unfused']:.1f} ms (prefix path / fused = {decode_ratio:.2f})"
    )
    for peer, result in peers.items():
        kind = "" if args.activation == "batchtopk" else " (BatchTopK: the peers have no Matryoshka TopK)"
        timing = result if isinstance(result, str) else f"{1e3 * result:.1f} ms"
        text += f"\n{peer} Matryoshka step{kind}: {timing}"
    print(text)
    if args.save:
        name = f"matryoshka-{args.device}-{meta['commit']}"
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": meta,
            "step_s": rows,
            "ratio": ratio,
            "decode_loss_s": decode_loss,
            "decode_loss_backend": backend,
            "decode_loss_speedup": decode_ratio,
            "peer_step_s": peers,
        }
        (results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (results / f"{name}.md").write_text(f"# Matryoshka step vs plain ({meta['commit']})\n\n{text}\n")


if __name__ == "__main__":
    main()
