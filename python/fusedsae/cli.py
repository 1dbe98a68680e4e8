"""The ``fusedsae`` command line: ``train``, ``info``, ``cache``, ``attribute``, ``toy``, ``eval``.

``fusedsae train`` with no arguments trains a TopK SAE on built-in toy-superposition data, prints a results table
and writes PNG plots to ``runs/toy``. Multi-process: ``torchrun --nproc-per-node N -m fusedsae train …``.
``fusedsae cache`` writes transformer activations to an on-disk cache (``train --data <cache dir>`` reads it);
``fusedsae attribute`` reports per-head and per-source-position attributions of an attention SAE's features.
``fusedsae toy <experiment>`` runs a toy study of which feature bases an SAE recovers (:mod:`fusedsae.experiments`).
``fusedsae eval`` splices SAEs into their model on held-out text and reports CE/KL or embedding scores
(:mod:`fusedsae.evals`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RUN_CONFIG = "run_config.json"

TOY_KINDS = ("sparse", "superposition", "composed")
# text settings of `train --data live:…` (a run_config.json written before they existed resumes with these)
_TEXT_DEFAULTS = {"text": "pydoc", "dataset": None, "text_column": "text", "split": "all", "heldout_fraction": 0.1}


def _int_or_list(text: str) -> int | list[int]:
    """``"16"`` -> 16, ``"16,32"`` -> [16, 32] (a sweep: several SAEs trained from one pass)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from exc
    return values[0] if len(values) == 1 else values


def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default="toy:sparse",
        help="toy:sparse (Sharkey), toy:superposition (Elhage), toy:composed (Anders), a .safetensors file "
        "holding one [N, d_in] tensor, an activation cache folder written by `fusedsae cache`, or live:<model>:<layer> "
        "(attention z captured on the fly from the offline pydoc text, e.g. live:minilm:3) (default: toy:sparse)",
    )
    data.add_argument("--d-in", type=int, default=64, help="toy:sparse/composed input width (default 64)")
    data.add_argument("--n-features", type=int, default=256, help="toy:sparse true features (default 256)")
    data.add_argument("--mean-active", type=float, default=4.0, help="toy:sparse mean active features (default 4)")
    data.add_argument("--toy-seed", type=int, default=0, help="seed of the toy data's ground truth (default 0)")
    _add_text_args(data)
    data.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N steps, evaluate the SAE spliced into its model on the held-out split (cache or live data; "
        "writes eval.jsonl; default 0: off)",
    )
    data.add_argument("--eval-tokens", type=int, default=10000, help="held-out tokens per evaluation (default 10000)")

    sae = p.add_argument_group("SAE")
    sae.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "relu", "jumprelu"])
    sae.add_argument(
        "--k", type=_int_or_list, default=6, help="latents per token, topk/batchtopk (default 6); 16,32: a sweep"
    )
    sae.add_argument(
        "--d-sae",
        type=_int_or_list,
        default=None,
        help="latents (default: 2 x the true features, or 8 x d_in); 3072,6144 sweeps (one SAE per value, with --k's)",
    )
    sae.add_argument("--l1-coefficient", type=float, default=None, help="ReLU SAEs' L1 weight")
    sae.add_argument("--l0-coefficient", type=float, default=None, help="JumpReLU SAEs' L0 weight")
    sae.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    sae.add_argument(
        "--matryoshka-widths",
        type=_widths,
        default=None,
        help="Matryoshka prefix widths for topk/batchtopk, e.g. 128,512,2048 (d_sae is appended)",
    )

    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    train.add_argument("--batch-size", type=int, default=1024, help="tokens per step per process (default 1024)")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--lr-warm-up-steps", type=int, default=0)
    train.add_argument("--lr-decay-steps", type=int, default=None, help="linear decay at the end (default 20%%)")
    train.add_argument("--sparsity-warm-up-steps", type=int, default=0)
    train.add_argument(
        "--dead-tokens",
        type=int,
        default=None,
        help="tokens without firing before a latent counts as dead (default: 50 batches)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1… or auto (default)")
    train.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    train.add_argument(
        "--shard-latents",
        type=int,
        default=1,
        help="under torchrun: this many ranks share the latents (world = shards x data-parallel replicas; default 1)",
    )

    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/toy", help="run folder (default runs/toy)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument(
        "--overwrite", action="store_true", help="replace another run's files in --out (otherwise it is refused)"
    )
    run.add_argument(
        "--max-bad-steps",
        type=int,
        default=10,
        help="stop when this many consecutive steps have a NaN/Inf loss (their updates are skipped; default 10)",
    )
    run.add_argument("--checkpoint-every", type=int, default=200)
    run.add_argument("--log-every", type=int, default=50)
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedsae", description="Fast sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an SAE (toy superposition data by default)")
    _add_train_args(train)
    sub.add_parser("info", help="versions and which backends can run here")
    _add_cache_args(sub.add_parser("cache", help="capture transformer activations into an on-disk cache"))
    _add_attribute_args(
        sub.add_parser("attribute", help="per-head and per-source attribution of an attention SAE's features")
    )
    _add_toy_args(sub.add_parser("toy", help="toy experiments: which feature bases an SAE can and cannot recover"))
    _add_eval_args(sub.add_parser("eval", help="spliced-in evaluation of SAEs inside their model, on held-out text"))
    return parser


# -----------------------------------------------------------------------------------------------------------------
# train
# -----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str, local_rank: int) -> str:
    import torch

    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank:
        return f"cuda:{local_rank}"
    return name


def _widths(text: str) -> list[int]:
    """``--matryoshka-widths 128,512,2048`` -> [128, 512, 2048] (argparse turns the ValueError into one line)."""
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not widths:
        raise argparse.ArgumentTypeError("expected at least one width")
    return widths


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that defines the run, as saved to run_config.json (a resume rebuilds the run from it)."""
    skip = ("command", "resume", "overwrite", "no_plots", "no_progress", "threads")
    return {k: v for k, v in vars(args).items() if k not in skip}


def _build_data(settings: dict[str, Any], rank: int, world: int):
    import torch

    from fusedsae import toy
    from fusedsae.data import TensorSource, ToySource

    spec = settings["data"]
    if Path(spec).is_dir():
        from fusedsae.cache import CacheError, CacheSource

        try:
            return CacheSource(spec, settings["batch_size"], seed=settings["seed"], rank=rank, world_size=world)
        except (CacheError, ValueError) as exc:
            raise SystemExit(f"--data {spec}: {exc}") from exc
    if spec.startswith("live:"):
        return _live_source(spec, settings, rank, world)
    if spec.startswith("toy:"):
        kind = spec.split(":", 1)[1]
        if kind not in TOY_KINDS:
            raise SystemExit(f"unknown toy data {spec!r}; use one of {', '.join('toy:' + k for k in TOY_KINDS)}")
        if kind == "sparse":
            data = toy.SparseFeatureData(
                d_in=settings["d_in"],
                n_features=settings["n_features"],
                mean_active=settings["mean_active"],
                seed=settings["toy_seed"],
            )
        elif kind == "superposition":
            data = toy.SuperpositionData(seed=settings["toy_seed"])
        else:
            data = toy.ComposedFeatureData(d_in=settings["d_in"], seed=settings["toy_seed"])
        return ToySource(data, settings["batch_size"], rank, world)
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--data {spec}: no such file (expected toy:<kind> or a .safetensors file)")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    matrices = [t for t in tensors.values() if t.dim() == 2]
    if len(matrices) != 1:
        raise SystemExit(f"--data {spec}: expected exactly one 2-D tensor [N, d_in], found {len(matrices)}")
    return TensorSource(
        matrices[0].to(torch.float32),
        settings["batch_size"],
        seed=settings["seed"],
        rank=rank,
        world_size=world,
    )


def _default_d_sae(settings: dict[str, Any], source: Any) -> int:
    truth = getattr(source, "ground_truth", None)
    if truth is not None:
        return max(2 * int(truth.shape[0]), 8)
    return 8 * int(source.d_in)


def _init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    from fusedsae.elastic import process_group_timeout, start_parent_watchdog

    start_parent_watchdog()  # a worker whose torchrun agent dies stops instead of training on unsupervised
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=process_group_timeout())
    return dist.get_rank(), dist.get_world_size(), local_rank


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from fusedsae import plots

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = _run_settings(args)
    from fusedsae.checkpoint import CheckpointError, RunFolderError, new_run_id
    from fusedsae.training import TrainingDiverged, read_run_config

    if args.resume and (out / RUN_CONFIG).is_file():
        try:
            saved = read_run_config(out / RUN_CONFIG)
        except RunFolderError as exc:
            raise SystemExit(f"--resume: {exc}") from exc
        if args.steps is not None:
            saved["steps"] = args.steps
        saved["max_bad_steps"] = args.max_bad_steps
        saved["shard_latents"] = args.shard_latents  # a layout choice: checkpoints hold the whole dictionary
        settings = {**_run_settings(args), **saved}
    if not args.resume:
        settings["run_id"] = new_run_id()
    rank, world, local_rank = _init_distributed()
    shards = settings.get("shard_latents", 1)
    if shards < 1 or world % shards:
        raise SystemExit(f"--shard-latents {shards} must divide the number of processes ({world})")
    # the ranks of a shard group share every batch: the data is split over the replicas only
    data_rank, data_world = rank // shards, world // shards
    finished = False
    try:
        source = _build_data(settings, data_rank, data_world)
        steps = settings["steps"] or 1000
        settings.update(steps=steps)
        device = _resolve_device(settings["device"], local_rank)
        if _is_multi(settings, source):
            from fusedsae import multi

            if shards > 1:
                raise SystemExit("several SAEs from one pass (a sweep or several hooks) do not take --shard-latents")

            finished = multi.train_from_cli(args, settings, source, device, rank, world)
            return 0
        d_sae = settings["d_sae"] or _default_d_sae(settings, source)
        settings.update(d_sae=d_sae)
        activation = settings["activation"]
        trainer = make_trainer(
            settings, source, out, device, data_world, not args.no_progress, args.overwrite, shards=shards
        )
        cfg = trainer.sae.cfg
        try:
            resumed = args.resume and trainer.resume()
            if not resumed:
                trainer.start_run()  # locks --out; refuses a folder holding another run
            settings["run_id"] = trainer.run_id
            if rank == 0:
                from fusedsae.formats import atomic_write

                atomic_write(out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")
                if resumed:
                    print(f"resumed {out} at step {trainer.step}/{steps}", flush=True)
                elif args.resume:
                    print(f"no checkpoint in {out}; starting a new run", flush=True)
                add_periodic_evals([trainer], settings, device)
            metrics = trainer.train()
        except (TrainingDiverged, CheckpointError, RunFolderError) as exc:
            raise SystemExit(f"fusedsae train: {exc}") from exc
        finished = True
        W_dec = trainer.full_sae().W_dec  # a latent-sharded run gathers it on every rank
        if rank != 0:
            return 0
        print()
        print(
            f"{activation} SAE, d_in={cfg.d_in}, d_sae={cfg.d_sae}"
            + (f", k={cfg.k}" if cfg.k else "")
            + f", data={settings['data']}, device={device}, world={world}"
            + (f" ({trainer.grid.describe()})" if trainer.grid else "")
        )
        print(plots.results_table(metrics))
        if not args.no_plots:
            curves = plots.plot_training_curves(plots.read_metrics(out / "metrics.jsonl"), out / "training_curves.png")
            written = [curves]
            truth = getattr(source, "ground_truth", None)
            if truth is not None:
                written.append(plots.plot_decoder_vs_truth(W_dec, truth, out / "decoder_vs_truth.png"))
            print("plots: " + ", ".join(str(p) for p in written))
        print(f"SAE (SAELens folder): {out / 'sae'}")
        return 0
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if finished:  # leave together (rank 0 writes the tables and plots); gloo aborted once on a ragged exit
                dist.barrier()
            dist.destroy_process_group()


def add_periodic_evals(trainers: list[Any], settings: dict[str, Any], device: str) -> None:
    """--eval-every: a :class:`fusedsae.evals.PeriodicEval` callback on each trainer, all sharing one model and one
    set of held-out batches (the held-out split of the text the data was captured from)."""
    every = settings.get("eval_every") or 0
    if not every:
        return
    from fusedsae import evals as E
    from fusedsae.capture import HookSpec, texts_up_to
    from fusedsae.texts import heldout_settings

    loaded: tuple[Any, list[dict]] | None = None
    for trainer in trainers:
        info = trainer.data.describe() if hasattr(trainer.data, "describe") else {}
        if not isinstance(info.get("model"), str) or not isinstance(info.get("hook"), dict):
            raise SystemExit("--eval-every needs data captured from a model: a cache folder or live:<model>:<layer>")
        if loaded is None:
            model, tokenizer = _load_model(info["model"], device=device, with_head=True)
            max_length = int(info.get("max_length", 128))
            texts = texts_up_to(tokenizer, _select_texts(heldout_settings(info)), settings["eval_tokens"], max_length)
            batches = E.text_batches(tokenizer, texts, 16, max_length)
            if E.model_head(model) == "masked":
                batches = E.mask_for_mlm(batches, tokenizer.mask_token_id)
            loaded = (model, batches)
        hook = HookSpec.from_dict(info["hook"])
        trainer.callbacks.append(E.PeriodicEval(trainer, loaded[0], loaded[1], hook, every))


def _is_multi(settings: dict[str, Any], source: Any) -> bool:
    """Several SAEs from one pass: a sweep (--d-sae/--k lists) or a batch of several hooks side by side."""
    info = source.describe() if hasattr(source, "describe") else {}
    return isinstance(settings["d_sae"], list) or isinstance(settings["k"], list) or "hooks" in info


def make_trainer(
    settings: dict[str, Any],
    data: Any,
    out: Path,
    device: str,
    world: int,
    progress: bool,
    overwrite: bool,
    shards: int = 1,
) -> Any:
    """The SAE and Trainer of one run of ``fusedsae train`` (``settings`` with a single d_sae, None for the default,
    and k) reading ``data`` (the data source, or its :class:`fusedsae.multi.SharedView` in a multi-SAE run);
    ``world`` counts the data-parallel replicas, ``shards`` the ranks that share the latents."""
    import torch

    from fusedsae.config import SAEConfig
    from fusedsae.sae import SparseAutoencoder
    from fusedsae.training import TrainConfig, Trainer

    steps = settings["steps"]
    sae_kwargs: dict[str, Any] = {}
    if settings["l1_coefficient"] is not None:
        sae_kwargs["l1_coefficient"] = settings["l1_coefficient"]
    if settings["l0_coefficient"] is not None:
        sae_kwargs["l0_coefficient"] = settings["l0_coefficient"]
    activation = settings["activation"]
    cfg = SAEConfig(
        d_in=data.d_in,
        d_sae=settings["d_sae"] or _default_d_sae(settings, data),
        activation=activation,
        k=settings["k"] if activation in ("topk", "batchtopk") else None,
        dtype=settings["dtype"],
        device=device,
        n_heads=getattr(data, "n_heads", None),
        metadata={"dataset_path": settings["data"], **_source_metadata(data)},
        matryoshka_widths=settings.get("matryoshka_widths"),
        **sae_kwargs,
    )
    torch.manual_seed(settings["seed"])
    if shards > 1:  # each rank initialises only its slice (the whole SAE may not fit one device)
        from fusedsae.sharding import ProcessGrid, ShardedAutoencoder

        sae = ShardedAutoencoder(cfg, ProcessGrid(shards))
    else:
        sae = SparseAutoencoder(cfg)
    decay = settings["lr_decay_steps"]
    train_cfg = TrainConfig(
        steps=steps,
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        lr_warm_up_steps=settings["lr_warm_up_steps"],
        lr_decay_steps=steps // 5 if decay is None else decay,
        sparsity_warm_up_steps=settings["sparsity_warm_up_steps"],
        dead_tokens=settings["dead_tokens"] or 50 * settings["batch_size"] * world,
        checkpoint_every=settings["checkpoint_every"],
        log_every=settings["log_every"],
        run_dir=str(out),
        seed=settings["seed"],
        progress=progress,
        max_bad_steps=settings["max_bad_steps"],
        run_id=settings.get("run_id"),
        overwrite=overwrite,
        shard_latents=shards,
    )
    try:
        return Trainer(sae, data, train_cfg)
    except ValueError as exc:  # a setting the trainer refuses (e.g. --batch-size too small for AuxK)
        raise SystemExit(f"fusedsae train: {exc}") from exc


def _live_source(spec: str, settings: dict[str, Any], rank: int, world: int):
    """``live:<model>:<layer>[,<layer>…]``: z of those attention layers (one forward pass, side by side), captured
    while training from the text of --text/--dataset/--split (default: the pydoc text)."""
    from fusedsae.cache import LiveSource
    from fusedsae.capture import attention_hooks
    from fusedsae.texts import describe

    parts = spec.split(":")
    layers = parts[2].split(",") if len(parts) == 3 else []
    if not layers or not all(layer.isdigit() for layer in layers):
        raise SystemExit(f"--data {spec}: expected live:<model>:<layer>, e.g. live:minilm:3 (or live:minilm:1,3,5)")
    model, tokenizer = _load_model(parts[1])
    found = [attention_hooks(model, int(layer)) for layer in layers]
    text = {k: settings.get(k, v) for k, v in _TEXT_DEFAULTS.items()}
    layer_info: int | list[int] = [int(x) for x in layers] if len(layers) > 1 else int(layers[0])
    return LiveSource(
        model,
        tokenizer,
        _select_texts(text),
        [h.z for h in found] if len(found) > 1 else found[0].z,
        settings["batch_size"],
        n_heads=found[0].n_heads,
        seed=settings["seed"],
        rank=rank,
        world_size=world,
        info={"model": parts[1], "layer": layer_info, **describe(**text)},
    )


def _source_metadata(source: Any) -> dict[str, Any]:
    """SAELens metadata keys (model_name, hook_name) of a cached data source, for the SAE's cfg.json."""
    info = source.describe() if hasattr(source, "describe") else {}
    out = {}
    if "model" in info:
        out["model_name"] = info["model"]
    if isinstance(info.get("hook"), dict):
        out["hook_name"] = info["hook"]["module"]
        out["hook_spec"] = info["hook"]  # module, input/output, layout: what `fusedsae eval` splices
    for key in ("text", "dataset", "text_column", "split", "heldout_fraction", "max_length"):
        if key in info:
            out[key] = info[key]
    return out


# -----------------------------------------------------------------------------------------------------------------
# cache
# -----------------------------------------------------------------------------------------------------------------


def _add_text_args(group: Any, default: str = "pydoc", split: str = "all") -> None:
    """--text/--dataset/--text-column/--split/--heldout-fraction (fusedsae.texts)."""
    group.add_argument(
        "--text",
        default=default,
        help="pydoc (language reference topics), stdlib (docstrings), all, or your own text: a file (one document per "
        "line; .jsonl: a 'text' field per line), a folder or a glob (one document per file) (default %(default)s)",
    )
    group.add_argument(
        "--dataset", default=None, help="a Hugging Face dataset saved with save_to_disk (needs datasets)"
    )
    group.add_argument("--text-column", default="text", help="the --dataset column holding the text (default text)")
    group.add_argument(
        "--split",
        default=split,
        choices=["all", "train", "heldout"],
        help="documents to use: all, the training split or the held-out split (by a hash of each document; "
        "default %(default)s)",
    )
    group.add_argument("--heldout-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")


def _text_settings(args: Any) -> dict[str, Any]:
    return {
        "text": args.text,
        "dataset": args.dataset,
        "text_column": args.text_column,
        "split": args.split,
        "heldout_fraction": args.heldout_fraction,
    }


def _select_texts(settings: dict[str, Any]) -> list[str]:
    from fusedsae.texts import TextSourceError, select_texts

    try:
        return select_texts(**settings)
    except TextSourceError as exc:
        raise SystemExit(str(exc)) from exc


def _load_model(name: str, device: str = "cpu", with_head: bool = False) -> tuple[Any, Any]:
    from fusedsae.capture import ModelNotFoundError, load_model

    try:
        return load_model(name, device=device, with_head=True) if with_head else load_model(name, device=device)
    except ModelNotFoundError as exc:
        raise SystemExit(str(exc)) from exc


def _add_model_args(p: argparse.ArgumentParser, text_default: str | None) -> None:
    model = p.add_argument_group("model and text")
    model.add_argument(
        "--model",
        default=None if text_default is None else "minilm",
        help="transformers model: 'minilm' (offline MiniLM-L6, the default) or a local folder",
    )
    model.add_argument(
        "--layer",
        type=_int_or_list,
        default=None,
        help="attention layer whose z (input of the output projection) to use, for BERT-like models and GPT-2 "
        "(cache: 1,3,5 captures several layers from one forward pass)",
    )
    _add_text_args(model, text_default or "pydoc")
    model.add_argument("--max-length", type=int, default=128, help="tokens per text at most (default 128)")
    model.add_argument("--device", default="cpu", help="device of the model (default cpu)")
    model.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="cache folder (an interrupted capture into it resumes)")
    _add_model_args(p, "pydoc")
    hook = p.add_argument_group("hook (instead of --layer)")
    hook.add_argument("--hook", default=None, help="module path, e.g. encoder.layer.3.attention.output.dense")
    hook.add_argument("--io", default="input", choices=["input", "output"], help="the module's input or output")
    hook.add_argument("--n-heads", type=int, default=None, help="heads in the hooked tensor (enables attribution)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after the texts holding this many tokens")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--shard-tokens", type=int, default=65536, help="rows per shard, at least (default 65536)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache in --out first")
    p.add_argument("--no-progress", action="store_true")


def _model_hook(args: argparse.Namespace, model: Any) -> tuple[Any, int | None, dict[str, Any]]:
    from fusedsae.capture import HookSpec, attention_hooks

    if args.hook:
        return HookSpec(args.hook, args.io), args.n_heads, {}
    if args.layer is None:
        raise SystemExit("give --layer (attention z of that layer) or --hook (any module path)")
    if isinstance(args.layer, list):  # several layers from one forward pass, side by side
        found = [attention_hooks(model, layer) for layer in args.layer]
        return [h.z for h in found], found[0].n_heads, {"layer": args.layer}
    hooks = attention_hooks(model, args.layer)
    return hooks.z, hooks.n_heads, {"layer": args.layer}


def _hooks_text(hook: Any) -> str:
    hooks = hook if isinstance(hook, list) else [hook]
    return ("hook " if len(hooks) == 1 else "hooks ") + ", ".join(f"{h.module} ({h.io})" for h in hooks)


def cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from fusedsae.cache import CacheError, write_cache
    from fusedsae.capture import texts_up_to
    from fusedsae.texts import describe

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load_model(args.model, device=args.device)
    hook, n_heads, extra = _model_hook(args, model)
    texts = texts_up_to(tokenizer, _select_texts(_text_settings(args)), args.max_tokens, args.max_length)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), unit="text", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.n = done
            bar.refresh()

    try:
        cache = write_cache(
            args.out,
            model,
            tokenizer,
            texts,
            hook,
            n_heads=n_heads,
            source={"model": args.model, **describe(**_text_settings(args)), **extra},
            batch_size=args.batch_size,
            max_length=args.max_length,
            shard_tokens=args.shard_tokens,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=progress,
        )
    except CacheError as exc:
        raise SystemExit(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    print(
        f"cache {cache.path}: {cache.rows:,} tokens x d_in={cache.d_in} ({cache.dtype}) in {cache.n_shards} shard(s) "
        f"from {len(texts)} texts; {_hooks_text(hook)}" + (f", {n_heads} heads" if n_heads else "")
    )
    return 0


# -----------------------------------------------------------------------------------------------------------------
# attribute
# -----------------------------------------------------------------------------------------------------------------


def _add_attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder (e.g. runs/minilm/sae)")
    p.add_argument("--cache", default=None, help="activation cache to scan (default: capture live with --model)")
    _add_model_args(p, None)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="tokens to scan (default: the whole cache, or 20000 live)"
    )
    p.add_argument("--features", default=None, help="comma-separated feature ids (default: the --top most frequent)")
    p.add_argument("--top", type=int, default=5, help="how many features when --features is not given (default 5)")
    p.add_argument("--contexts", type=int, default=5, help="top-activating contexts per feature (default 5)")
    p.add_argument("--convention", default="raw", choices=["raw", "centred"])
    p.add_argument(
        "--no-model",
        action="store_true",
        help="with --cache: do not run the model (only its tokenizer, for contexts; no per-source breakdown)",
    )
    p.add_argument("--out", default=None, help="folder for attribution.json and PNGs (default: next to the SAE)")
    p.add_argument("--no-plots", action="store_true")


def cmd_attribute(args: argparse.Namespace) -> int:
    import torch

    from fusedsae.analysis import report as R
    from fusedsae.formats import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    if isinstance(args.layer, list):
        raise SystemExit(f"attribute reads one layer; got --layer {','.join(map(str, args.layer))}")
    sae = load_sae(args.sae, device=args.device).eval()
    requested = None
    if args.features:  # checked before the scan, which can take minutes
        try:
            requested = [int(f) for f in args.features.split(",")]
        except ValueError as exc:
            raise SystemExit(f"--features {args.features!r}: expected comma-separated integers") from exc
        bad = [f for f in requested if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise SystemExit(f"--features {bad} out of range: the SAE has d_sae={sae.cfg.d_sae}")
    model = tokenizer = hooks = None
    z_of_row = None
    if args.cache:
        from fusedsae.cache import ActivationCache, CacheError

        try:
            cache = ActivationCache(args.cache)
        except CacheError as exc:
            raise SystemExit(str(exc)) from exc
        info = cache.source
        model_name = args.model or info.get("model")
        layer = args.layer if args.layer is not None else info.get("layer")
        if "hooks" in info:
            raise SystemExit(f"{args.cache} holds several hooks side by side; attribute reads a one-hook cache")
        n_heads = sae.cfg.n_heads or cache.n_heads
        batches, text_tokens, z_of_row = R.cache_reader(cache, args.max_tokens)
        if model_name is None:
            raise SystemExit(f"{args.cache} does not say which model wrote it; give --model (its tokenizer is needed)")
        from fusedsae.capture import attention_hooks, load_model

        model, tokenizer = load_model(model_name, device=args.device)
        if args.no_model or layer is None:
            model = None
        else:
            hooks = attention_hooks(model, layer)
    else:
        from fusedsae.capture import attention_hooks, load_model

        if args.layer is None:
            raise SystemExit("give --cache, or --layer with --model (default minilm) to capture live")
        model, tokenizer = load_model(args.model or "minilm", device=args.device)
        hooks = attention_hooks(model, args.layer)
        n_heads = sae.cfg.n_heads or hooks.n_heads
        from fusedsae.capture import texts_up_to

        texts = texts_up_to(tokenizer, _select_texts(_text_settings(args)), args.max_tokens or 20000, args.max_length)
        batches, text_tokens = R.live_reader(model, tokenizer, hooks, texts, args.max_length)
    if n_heads is None:
        raise SystemExit(f"{args.sae} has no n_heads and the data does not say it; attribution needs head-major z")
    if sae.cfg.n_heads is None:
        sae.cfg = sae.cfg.replace(n_heads=n_heads)
    found = R.scan(sae, batches, n_contexts=args.contexts)
    features = requested if requested is not None else R.choose_features(found, args.top)
    reports = R.build_reports(
        sae, found, features, text_tokens, tokenizer, args.convention, model=model, hooks=hooks, z_of_row=z_of_row
    )
    out = Path(args.out) if args.out else Path(args.sae).resolve().parent / "attribution"
    out.mkdir(parents=True, exist_ok=True)
    print(f"scanned {found.n_tokens:,} tokens; SAE {args.sae} ({sae.cfg.activation}, d_sae={sae.cfg.d_sae})")
    for rep in reports:
        print()
        print(R.format_report(rep))
    (out / "attribution.json").write_text(json.dumps(R.to_json(reports), indent=1) + "\n")
    written = [out / "attribution.json"]
    if not args.no_plots:
        for rep in reports:
            written.extend(R.plot_report(rep, out))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


# -----------------------------------------------------------------------------------------------------------------
# toy
# -----------------------------------------------------------------------------------------------------------------


def _add_toy_args(p: argparse.ArgumentParser) -> None:
    from fusedsae.experiments import EXPERIMENTS, LAB, LAB_HELP

    p.add_argument(
        "experiment",
        choices=[*EXPERIMENTS, "all", *LAB],
        help="; ".join(f"{name}: {e.question}" for name, e in EXPERIMENTS.items())
        + "; all: those three; "
        + "; ".join(f"{name}: {LAB_HELP[name]}" for name in LAB),
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per SAE (default 600; the composed lab: 2000)"
    )
    p.add_argument("--seeds", type=int, default=8, help="composed lab: SAEs per cell, batched (default 8)")
    p.add_argument(
        "--toy",
        choices=["plus", "trained", "retrained"],
        default="plus",
        help="composed lab: the idealised + (default), a toy model trained at q = 0, or one retrained per cell",
    )
    p.add_argument("--l1-coefficient", type=float, default=0.1, help="composed lab: ReLU + L1 (default 0.1)")
    p.add_argument("--quick", action="store_true", help="composed lab: 2 seeds, 300 steps (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, … or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", default="runs/toy-experiments", help="writes <experiment>.json and .png here")
    p.add_argument("--no-plots", action="store_true")


def _print_case(row: dict[str, Any]) -> None:
    from fusedsae.experiments import settings

    described = ", ".join(f"{k}={v}" for k, v in settings(row).items())
    print(f"  {described}: {row['basis']} ({row['seconds']:.1f} s)", flush=True)


def cmd_toy(args: argparse.Namespace) -> int:
    import torch

    from fusedsae import plots
    from fusedsae.experiments import EXPERIMENTS, run_experiment

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.experiment in _lab_names():
        return _cmd_toy_lab(args, out)
    args.steps = 600 if args.steps is None else args.steps
    device = _resolve_device(args.device, 0)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        print(f"{name}: {EXPERIMENTS[name].question}", flush=True)
        result = run_experiment(
            name,
            steps=args.steps,
            seed=args.seed,
            device=device,
            on_row=_print_case,
        )
        print(result.table())
        record = {**result.to_dict(), "steps": args.steps, "seed": args.seed, "device": device}
        written = [out / f"{name}.json"]
        written[0].write_text(json.dumps(record, indent=2) + "\n")
        if not args.no_plots:
            written.append(plots.plot_experiment(result, out / f"{name}.png"))
        print("wrote " + ", ".join(str(p) for p in written) + "\n", flush=True)
    return 0


def _lab_names() -> list[str]:
    from fusedsae.experiments import LAB

    return list(LAB)


def _cmd_toy_lab(args: argparse.Namespace, out: Path) -> int:
    """``fusedsae toy onehot|rotation|authors|width|l0|hierarchy``: the composed-features lab (CPU)."""
    import torch

    from fusedsae import experiments

    if not args.threads:
        torch.set_num_threads(1)  # tiny batched SAEs: more threads only synchronise (9x slower on a busy 2-core box)
    try:
        cfg = experiments.LabConfig(
            seeds=2 if args.quick else args.seeds,
            steps=args.steps or (300 if args.quick else 2000),
            embedding=args.toy,
            l1_coefficient=args.l1_coefficient,
            seed=args.seed,
            probe_steps=100 if args.quick else 200,
        )
    except ValueError as e:
        raise SystemExit(f"fusedsae toy {args.experiment}: {e}") from None
    result = experiments.LAB[args.experiment](cfg)
    print(f"{result.name}: {result.question}")
    print(result.table(experiments.headline_columns(result)))
    if result.notes.get("crossovers"):
        print("\ncrossovers (one-hot fraction q):")
        for note in result.notes["crossovers"]:
            print("  " + ", ".join(f"{k}={experiments.format_value(v)}" for k, v in note.items()))
    written = result.write(out)
    if not args.no_plots:
        written += experiments.lab_figures(result, out, cfg.seeds)
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


# -----------------------------------------------------------------------------------------------------------------
# eval
# -----------------------------------------------------------------------------------------------------------------


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", action="append", required=True, help="SAE folder; repeat for several (one model)")
    p.add_argument("--json", required=True, help="write the metrics here (a plot goes next to it, .png)")
    model = p.add_argument_group("model and text")
    model.add_argument("--model", default=None, help="model name or local folder (default: the SAE's metadata)")
    _add_text_args(model, "pydoc", split="heldout")
    model.add_argument("--max-tokens", type=int, default=20000, help="evaluate on this many tokens (default 20000)")
    model.add_argument("--max-length", type=int, default=128, help="tokens per text at most (default 128)")
    model.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    model.add_argument("--device", default="cpu", help="device of the model and the SAEs (default cpu)")
    model.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    hook = p.add_argument_group("hook (default: the one the SAE was trained on, from its metadata)")
    hook.add_argument("--hook", default=None, help="module path, e.g. encoder.layer.3.attention.output.dense")
    hook.add_argument("--io", default="input", choices=["input", "output"], help="the module's input or output")
    p.add_argument("--no-plots", action="store_true")


def _eval_name(folder: str, taken: set[str]) -> str:
    path = Path(folder).resolve()
    name = path.parent.name if path.name == "sae" else path.name
    return name if name not in taken else str(folder)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fusedsae import evals as E
    from fusedsae.capture import HookSpec, texts_up_to
    from fusedsae.formats import SAEFormatError, load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit(f"--max-tokens must be >= 1, got {args.max_tokens}")
    targets, models = [], set()
    for folder in args.sae:
        try:
            sae = load_sae(folder, device=args.device).eval()
        except SAEFormatError as exc:
            raise SystemExit(str(exc)) from exc
        recorded = E.recorded_source(sae)
        if args.hook:
            hook = HookSpec(args.hook, args.io)
        elif isinstance(recorded.get("hook"), dict):
            hook = HookSpec.from_dict(recorded["hook"])
        else:
            raise SystemExit(f"{folder} does not record which tensor it was trained on; give --hook and --io")
        models.add(args.model or recorded.get("model"))
        targets.append(E.Target(_eval_name(folder, {t.name for t in targets}), sae, hook))
    if None in models:
        raise SystemExit("an SAE does not record its model; give --model (a name or a local folder)")
    if len(models) > 1:
        raise SystemExit(f"the SAEs come from different models ({', '.join(sorted(models))}); evaluate one at a time")
    model_name = models.pop()
    model, tokenizer = _load_model(model_name, device=args.device, with_head=True)
    text = _text_settings(args)
    texts = texts_up_to(tokenizer, _select_texts(text), args.max_tokens, args.max_length)
    batches = E.text_batches(tokenizer, texts, args.batch_size, args.max_length)
    if E.model_head(model) == "masked":
        batches = E.mask_for_mlm(batches, tokenizer.mask_token_id)
    try:
        result = E.evaluate(model, batches, targets)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    result.info.update(model=model_name, **{k: v for k, v in text.items() if v is not None})
    print(
        f"{result.n_tokens:,} tokens of {result.n_texts} texts ({args.text if not args.dataset else args.dataset}, "
        f"split {args.split}); model {model_name} ({result.head if result.head != 'none' else 'no'} LM head)"
    )
    print(result.table())
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written = [out]
    if not args.no_plots:
        written.append(E.plot(result, out.with_suffix(".png")))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


# -----------------------------------------------------------------------------------------------------------------
# info
# -----------------------------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import numpy
    import torch

    import fusedsae
    from fusedsae import backends

    lines = [
        f"fusedsae {fusedsae.__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__}",
        f"numpy    {numpy.__version__}",
    ]
    try:
        import triton

        lines.append(f"triton   {triton.__version__}")
    except ImportError:
        lines.append("triton   not installed")
    if torch.cuda.is_available():
        lines.append(
            f"cuda     {torch.version.cuda}, {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
        )
    else:
        lines.append("cuda     no GPU visible to torch")
    lines.append(f"FUSEDSAE_BACKEND={os.environ.get('FUSEDSAE_BACKEND', 'auto')}")
    print("\n".join(lines))
    print("\nbackends:")
    for name, entry in backends.report().items():
        status = "available" if entry["available"] else "unavailable"
        print(f"  {name:<10} {status:<12} {entry['reason']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "cache":
        return cmd_cache(args)
    if args.command == "attribute":
        return cmd_attribute(args)
    if args.command == "toy":
        return cmd_toy(args)
    if args.command == "eval":
        return cmd_eval(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
