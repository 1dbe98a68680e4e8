"""Tokens/s of several SAEs trained from one activation pass (fusedsae.multi) against the same SAEs trained one
after another, on MiniLM layer 3 (the README's "Several SAEs from one pass" numbers).

    .venv/bin/python scripts/bench_multi_sae.py [--source live|cache] [--steps 40] [--batch-size 256]

``live`` captures z from the model while training (each SAE trained alone runs the model again); ``cache`` reads
a cache folder written by ``fusedsae cache`` (``--cache``). Prints one line per setting and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fusedsae import SparseAutoencoder, TrainConfig, Trainer
from fusedsae.multi import MultiTrainer, SharedView

SWEEP = [(3072, 16), (3072, 32), (6144, 16), (6144, 32)]  # (d_sae, k)


def make_source(args: argparse.Namespace):
    if args.source == "cache":
        from fusedsae.cache import CacheSource

        return CacheSource(args.cache, args.batch_size, seed=0)
    from fusedsae.cache import LiveSource
    from fusedsae.capture import attention_hooks, load_model
    from fusedsae.texts import select_texts

    if not hasattr(make_source, "model"):
        make_source.model = load_model("minilm")  # type: ignore[attr-defined]
    model, tokenizer = make_source.model  # type: ignore[attr-defined]
    hooks = attention_hooks(model, 3)
    texts = select_texts("pydoc", split="train")
    # small shuffle buffers, so that a short run captures only the tokens it trains on
    return LiveSource(
        model, tokenizer, texts, hooks.z, args.batch_size, n_heads=hooks.n_heads, buffer_texts=args.buffer_texts
    )


def trainer(data, d_sae: int, k: int, steps: int, batch_size: int) -> Trainer:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=data.d_in, d_sae=d_sae, activation="topk", k=k, n_heads=12)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, log_every=steps, progress=False, dead_tokens=10**9)
    return Trainer(sae, data, cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="live", choices=["live", "cache"])
    p.add_argument("--cache", default="runs/minilm-train-cache")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--buffer-texts", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    make_source(args) if args.source == "live" else None  # load the model outside the timings
    tokens = args.steps * args.batch_size

    start = time.perf_counter()
    for d_sae, k in SWEEP:
        trainer(make_source(args), d_sae, k, args.steps, args.batch_size).train()
    alone = time.perf_counter() - start

    start = time.perf_counter()  # building the source is timed too, as it is in the runs above
    source = make_source(args)
    trainers = [trainer(SharedView(source), d_sae, k, args.steps, args.batch_size) for d_sae, k in SWEEP]
    MultiTrainer(trainers, source).train()
    together = time.perf_counter() - start

    n = len(SWEEP)
    summary = {
        "source": args.source,
        "saes": [f"d_sae={d}, k={k}" for d, k in SWEEP],
        "tokens_per_sae": tokens,
        "one_after_another_s": round(alone, 1),
        "together_s": round(together, 1),
        "one_after_another_sae_tokens_per_s": round(n * tokens / alone),
        "together_sae_tokens_per_s": round(n * tokens / together),
        "speed_up": round(alone / together, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
