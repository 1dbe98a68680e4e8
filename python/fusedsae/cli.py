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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusedsae import __version__
from fusedsae.formats import atomic_write
from fusedsae.tracking import TRACKERS

RUN_CONFIG = "run_config.json"

# Options that shape how a command runs, not what the run is: not saved in run_config.json, free on --resume.
NOT_SETTINGS = ("command", "resume", "overwrite", "no_plots", "no_progress", "threads", "debug", "given")
# Settings --resume applies when they differ from the saved run: they change the schedule's length, the step size
# or what is logged, never the SAE, its data or the optimizer state the checkpoint holds (--out is where the run
# was found, however it is spelled).
SAFE_ON_RESUME = (
    *("steps", "lr", "log_every", "checkpoint_every", "log", "wandb_project", "out", "max_bad_steps"),
    "shard_latents",  # a layout choice: checkpoints hold the whole dictionary
    *("eval_every", "eval_tokens"),  # what is evaluated and logged alongside, not the SAE
)
TOY_OPTIONS = ("d_in", "n_features", "mean_active", "toy_seed")
# text settings of `train --data live:…` (a run_config.json written before they existed resumes with these)
_TEXT_DEFAULTS = {"text": "pydoc", "dataset": None, "text_column": "text", "split": "all", "heldout_fraction": 0.1}


class UsageError(Exception):
    """A user's mistake on the command line (a bad value, a missing file, a device that is not there). Raised where
    the mistake is found, with one line that says what is wrong and what to do; :func:`main` prints it and exits 1
    (``--debug`` shows the traceback instead)."""


# -----------------------------------------------------------------------------------------------------------------
# parsing: one-line errors, defaults in --help, validated values
# -----------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (argparse prints the whole usage block first)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help, except where there is nothing to show (None, a flag's False) or
    the help already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _number(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and value != value:  # NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, True, "a whole number >= 1")
non_negative_int = _number(int, 0, True, "a whole number >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")
non_negative_float = _number(float, 0.0, True, "a number >= 0")


def _int_or_list(one: Callable[[str], int], what: str) -> Callable[[str], int | list[int]]:
    """A parser of ``"16"`` -> 16 and ``"16,32"`` -> [16, 32] (a sweep: several SAEs from one pass), each value
    checked by ``one`` (:func:`positive_int`, :func:`non_negative_int`); a bad value is one argparse line."""

    def parse(text: str) -> int | list[int]:
        parts = text.split(",")
        if len(parts) == 1:
            return one(text)  # its own message: "expected a whole number >= 1, got '2.5'"
        try:
            return [one(part.strip()) for part in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each {what}, got {text!r}") from None

    parse.__name__ = what
    return parse


positive_int_or_list = _int_or_list(positive_int, "a whole number >= 1")
non_negative_int_or_list = _int_or_list(non_negative_int, "a whole number >= 0")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _typed_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the user typed in ``argv``: a second parse with every default suppressed, so that only typed
    options appear (typing an option's default value still counts as typing it)."""
    parsers = [parser]
    seen: set[int] = set()
    while parsers:
        current = parsers.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default="toy:sparse",
        help="toy:sparse (Sharkey), toy:superposition (Elhage), toy:composed (Anders), a .safetensors file "
        "holding one [N, d_in] tensor, X.safetensors,Y.safetensors (transcoder pairs: input x, target y), an "
        "activation cache folder written by `fusedsae cache`, or live:<model>:<layer> (attention z captured on the "
        "fly from the offline pydoc text, e.g. live:minilm:3) or live:<model>:<module>[:input|:output]",
    )
    data.add_argument(
        "--target-hook",
        default=None,
        help="train a transcoder: y is this tensor of the same forward pass, MODULE[:input|:output] (default "
        "output), e.g. encoder.layer.3.output.dense, with live data; a cache written with --target-hook holds its "
        "pairs already (given here, it must be the cache's own target)",
    )
    data.add_argument("--d-in", type=positive_int, help="toy:sparse/composed input width (default: the toy's, 64/16)")
    data.add_argument("--n-features", type=positive_int, help="toy true features (default: the toy's, 256/20)")
    data.add_argument("--mean-active", type=positive_float, help="toy:sparse mean active features (default: 4)")
    data.add_argument("--toy-seed", type=non_negative_int, help="seed of the toy data's ground truth (default: 0)")
    _add_text_args(data)
    data.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="every N steps, evaluate the SAE spliced into its model on the held-out split (cache or live data; "
        "writes eval.jsonl; default 0: off)",
    )
    data.add_argument("--eval-tokens", type=positive_int, default=10000, help="held-out tokens per evaluation")

    sae = p.add_argument_group("SAE")
    sae.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "relu", "jumprelu"])
    sae.add_argument(
        "--k",
        type=positive_int_or_list,
        help="active latents per token, topk/batchtopk only (default: 6); 16,32: a sweep (one SAE per value)",
    )
    sae.add_argument(
        "--d-sae",
        type=positive_int_or_list,
        help="latents (default: 2 x the true features, or 8 x d_in); 3072,6144: a sweep (one SAE per value, with "
        "--k's)",
    )
    sae.add_argument("--l1-coefficient", type=non_negative_float, help="L1 weight, relu only (default: 1)")
    sae.add_argument("--l0-coefficient", type=non_negative_float, help="L0 weight, jumprelu only (default: 1)")
    sae.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    sae.add_argument(
        "--matryoshka-widths",
        type=_widths,
        default=None,
        help="Matryoshka prefix widths for topk/batchtopk, e.g. 128,512,2048 (d_sae is appended)",
    )
    sae.add_argument(
        "--skip-connection",
        action="store_true",
        help="add a learned linear skip from x to the reconstruction (a skip-transcoder, with (x, y) pair data)",
    )

    train = p.add_argument_group("training")
    train.add_argument("--steps", type=positive_int, help="optimizer steps (default: 1000)")
    train.add_argument("--batch-size", type=positive_int, default=1024, help="tokens per step per process")
    train.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    train.add_argument("--lr-warm-up-steps", type=non_negative_int, default=0, help="linear warm-up from 0")
    train.add_argument(
        "--lr-decay-steps", type=non_negative_int, help="linear decay at the end (default: 20%% of steps)"
    )
    train.add_argument("--sparsity-warm-up-steps", type=non_negative_int, default=0, help="L1/L0 weight warm-up")
    train.add_argument(
        "--dead-tokens",
        type=positive_int,
        help="tokens without firing before a latent counts as dead (default: 50 batches)",
    )
    train.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the SAE's initialisation and data order"
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1… or auto (a GPU when torch sees one)")
    train.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    train.add_argument(
        "--shard-latents",
        type=positive_int,
        default=1,
        help="under torchrun: this many ranks share the latents (world = shards x data-parallel replicas)",
    )

    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/toy", help="run folder")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument(
        "--overwrite", action="store_true", help="replace another run's files in --out (otherwise it is refused)"
    )
    run.add_argument(
        "--max-bad-steps",
        type=positive_int,
        default=10,
        help="stop when this many consecutive steps have a NaN/Inf loss (their updates are skipped)",
    )
    run.add_argument("--checkpoint-every", type=non_negative_int, default=200, help="steps (0: only at the end)")
    run.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics lines")
    run.add_argument(
        "--log",
        nargs="+",
        choices=TRACKERS,
        default=["jsonl"],
        help="where metrics go, one or more: jsonl (metrics.jsonl, always written), wandb (offline unless you are "
        "logged in), tensorboard (<out>/tensorboard)",
    )
    run.add_argument("--wandb-project", default="fusedsae", help="W&B project of --log wandb")
    run.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusedsae", description="Fast sparse autoencoders.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fusedsae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    _add_train_args(command("train", "train an SAE (toy superposition data by default)"))
    _add_common_args(command("info", "versions and which backends can run here"))
    _add_cache_args(command("cache", "capture transformer activations into an on-disk cache"))
    _add_attribute_args(command("attribute", "per-head and per-source attribution of an attention SAE's features"))
    _add_toy_args(command("toy", "toy experiments: which feature bases an SAE can and cannot recover"))
    _add_eval_args(command("eval", "spliced-in evaluation of SAEs inside their model, on held-out text"))
    return parser


# -----------------------------------------------------------------------------------------------------------------
# train
# -----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str, local_rank: int) -> str:
    """``--device`` as a torch device string; a device that is not there is a :class:`UsageError`."""
    import torch

    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:<index> or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        if device.index is None and local_rank:
            return f"cuda:{local_rank}"
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise UsageError(f"--device {name}: not usable here ({str(exc).splitlines()[0]})") from None
    return str(device)


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
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def _check_train_args(args: argparse.Namespace) -> None:
    """Refuses options that do not apply to the chosen activation or data, instead of ignoring them."""
    given = args.given
    activation = args.activation
    if "k" in given and activation not in ("topk", "batchtopk"):
        raise UsageError(f"--k applies to topk and batchtopk; a {activation} SAE takes no k (drop --k)")
    if "l1_coefficient" in given and activation != "relu":
        raise UsageError(f"--l1-coefficient applies to relu SAEs; a {activation} SAE has no L1 penalty")
    if "l0_coefficient" in given and activation != "jumprelu":
        raise UsageError(f"--l0-coefficient applies to jumprelu SAEs; a {activation} SAE has no L0 penalty")
    toy = [_option(name) for name in TOY_OPTIONS if name in given]
    if toy and not args.data.startswith("toy:"):
        raise UsageError(f"{', '.join(toy)} shape toy data only; --data {args.data} is not toy data")
    if args.k is not None and args.d_sae is not None and max(_as_list(args.k)) > min(_as_list(args.d_sae)):
        k, d_sae = max(_as_list(args.k)), min(_as_list(args.d_sae))
        raise UsageError(f"--k {k} is more than --d-sae {d_sae}: at most d_sae latents can be active")


def _resume_settings(args: argparse.Namespace, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """The settings of the run in ``out`` with the typed options of this command: a safe difference
    (:data:`SAFE_ON_RESUME`) is applied and said; any other is refused with the difference."""
    from fusedsae.checkpoint import RunFolderError
    from fusedsae.training import read_run_config

    try:
        saved = read_run_config(out / RUN_CONFIG)
    except RunFolderError as exc:
        raise UsageError(f"--resume: {exc}") from exc
    differing = [name for name in sorted(args.given) if name in settings and saved.get(name) != settings[name]]
    refused = [name for name in differing if name not in SAFE_ON_RESUME]
    if refused:
        was = ", ".join(f"{_option(n)} {_shown(saved.get(n))}" for n in refused)
        now = ", ".join(f"{_option(n)} {_shown(settings[n])}" for n in refused)
        raise UsageError(
            f"--resume: {out} was started with {was} but this command gives {now}; drop those options to continue "
            "that run, or train a new one in another --out"
        )
    for name in differing:
        print(f"resume: {_option(name)} {_shown(settings[name])} (was {_shown(saved.get(name))})", flush=True)
    return {**settings, **saved, **{name: settings[name] for name in differing}}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _build_data(settings: dict[str, Any], rank: int, world: int) -> Any:
    from fusedsae.data import from_spec

    if settings["data"].startswith("live:"):  # the text options and several layers (fusedsae.data's takes pydoc)
        return _live_source(settings["data"], settings, rank, world)
    if settings.get("target_hook") and settings["data"].startswith("toy:"):
        raise UsageError(
            f"--target-hook applies to data captured from a model (live:… or a cache); --data {settings['data']} is "
            "toy data"
        )

    toy_options = {name: settings[name] for name in ("d_in", "n_features", "mean_active") if settings.get(name)}
    if settings.get("toy_seed") is not None:
        toy_options["seed"] = settings["toy_seed"]
    return from_spec(
        settings["data"],
        settings["batch_size"],
        seed=settings["seed"],
        rank=rank,
        world_size=world,
        toy_options=toy_options,
        target_hook=settings.get("target_hook"),
    )


def _check_pair_settings(settings: dict[str, Any], source: Any) -> None:
    """Transcoder options against the data: a sweep takes no (x, y) pairs, and a resumed run's data must split as it
    did (the run config records ``widths``)."""
    from fusedsae.data import widths_text

    d_out = getattr(source, "d_out", None)
    widths = {"d_in": int(source.d_in), "d_out": d_out}
    saved = settings.get("widths")
    if saved is not None and saved != widths:
        raise UsageError(
            f"--resume: the run was trained on {widths_text(saved['d_in'], saved['d_out'])} but --data "
            f"{settings['data']} now gives {widths_text(widths['d_in'], widths['d_out'])}; resume with the same data"
        )
    settings["widths"] = widths


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


def _trackers(settings: dict[str, Any], out: Path, resume_step: int | None = None) -> list[Any]:
    """The ``--log`` callbacks besides metrics.jsonl (which the trainer always writes), with the run config; a run
    resumed at ``resume_step`` continues its W&B run (same id) and hides its TensorBoard events past that step."""
    from fusedsae import tracking

    callbacks: list[Any] = []
    try:
        if "tensorboard" in settings["log"]:
            callbacks.append(tracking.TensorBoardLogger(out / "tensorboard", config=settings, resume_step=resume_step))
            print(f"tensorboard: {out / 'tensorboard'} (tensorboard --logdir {out})", flush=True)
        if "wandb" in settings["log"]:
            logger = tracking.WandbLogger(
                settings["wandb_project"], name=out.name, dir=out, config=settings, run_id=settings.get("run_id")
            )
            callbacks.append(logger)
            hint = f"; upload with `wandb sync {logger.dir}`" if logger.mode == "offline" else ""
            print(f"wandb: {logger.mode} run in {logger.dir}{hint}", flush=True)
    except ImportError as exc:
        for callback in callbacks:
            callback.close()
        raise UsageError(f"--log: {exc}") from exc
    return callbacks


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from fusedsae import plots

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_train_args(args)
    out = Path(args.out)
    settings = _run_settings(args)
    from fusedsae.checkpoint import new_run_id

    if args.resume and (out / RUN_CONFIG).is_file():
        settings = _resume_settings(args, settings, out)
    if not args.resume:
        settings["run_id"] = new_run_id()
    rank, world, local_rank = _init_distributed()
    shards = settings.get("shard_latents", 1)
    if shards < 1 or world % shards:
        saved = " (the run was saved with it; pass --shard-latents to resume on another layout)" if args.resume else ""
        raise UsageError(f"--shard-latents {shards} must divide the number of processes ({world}){saved}")
    # the ranks of a shard group share every batch: the data is split over the replicas only
    data_rank, data_world = rank // shards, world // shards
    finished = False
    try:
        device = _resolve_device(settings["device"], local_rank)
        source = _build_data(settings, data_rank, data_world)
        _check_pair_settings(settings, source)
        steps = settings["steps"] or 1000
        settings.update(steps=steps)
        sparse = settings["activation"] in ("topk", "batchtopk")
        settings["k"] = (settings["k"] or 6) if sparse else None
        if _is_multi(settings, source):
            from fusedsae import multi

            if shards > 1:
                raise UsageError(
                    "several SAEs from one pass (a sweep or several hooks) do not take --shard-latents; drop it, "
                    "or train one SAE per run"
                )
            extra = [name for name in settings["log"] if name != "jsonl"]
            if extra:
                raise UsageError(
                    f"--log {' '.join(extra)}: several SAEs from one pass write metrics.jsonl per SAE only; "
                    "drop it, or train one SAE per run"
                )
            finished = multi.train_from_cli(args, settings, source, device, rank, world)
            return 0
        d_sae = settings["d_sae"] or _default_d_sae(settings, source)
        settings.update(d_sae=d_sae)
        activation = settings["activation"]
        k = settings["k"]
        if k is not None and k > d_sae:
            raise UsageError(
                f"--k {k} is more than the SAE's {d_sae} latents (--d-sae); give a smaller --k or a larger --d-sae"
            )
        trainer = make_trainer(
            settings, source, out, device, data_world, not args.no_progress, args.overwrite, shards=shards
        )
        cfg = trainer.sae.cfg
        resumed = args.resume and trainer.resume()
        if not resumed:
            trainer.start_run()  # locks --out; refuses a folder holding another run
        settings["run_id"] = trainer.run_id
        if rank == 0:
            # trackers and evaluations start once the run folder is ours: a refused run leaves no W&B run behind
            try:
                trainer.callbacks.extend(_trackers(settings, out, trainer.step if resumed else None))
                add_periodic_evals([trainer], settings, device)
            except UsageError:
                trainer.close()  # the run folder's lock
                raise
            atomic_write(out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")
            if resumed:
                print(f"resumed {out} at step {trainer.step}/{steps}", flush=True)
            elif args.resume:
                print(f"no checkpoint in {out}; starting a new run", flush=True)
        metrics = trainer.train()
        finished = True
        truth = getattr(source, "ground_truth", None)
        # only the toy plot needs the whole W_dec: a latent-sharded run gathers it (on every rank) for that alone
        W_dec = trainer.full_sae().W_dec if truth is not None and not args.no_plots else None
        if rank != 0:
            return 0
        print()
        d_out = settings["widths"]["d_out"]
        kind = "SAE" if d_out is None else ("skip-transcoder" if settings.get("skip_connection") else "transcoder")
        print(
            f"{activation} {kind}, d_in={cfg.d_in}"
            + (f", d_out={d_out}" if d_out is not None else "")
            + f", d_sae={cfg.d_sae}"
            + (f", k={cfg.k}" if cfg.k else "")
            + f", data={settings['data']}, device={device}, world={world}"
            + (f" ({trainer.grid.describe()})" if trainer.grid else "")
        )
        print(plots.results_table(metrics))
        if not args.no_plots:
            curves = plots.plot_training_curves(
                plots.read_metrics(out / "metrics.jsonl"), out / "training_curves.png", activation=activation
            )
            written = [curves]
            if truth is not None and W_dec is not None:
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
            raise UsageError(
                "--eval-every needs data captured from a model: a cache folder or live:<model>:<layer> (or drop it)"
            )
        if loaded is None:
            model, tokenizer = _load_model(info["model"], device=device, with_head=True)
            max_length = int(info.get("max_length", 128))
            texts = texts_up_to(tokenizer, _select_texts(heldout_settings(info)), settings["eval_tokens"], max_length)
            batches = E.text_batches(tokenizer, texts, 16, max_length)
            if E.model_head(model) == "masked":
                batches = E.mask_for_mlm(batches, tokenizer.mask_token_id)
            loaded = (model, batches)
        hook = HookSpec.from_dict(info["hook"])
        target = HookSpec.from_dict(info["target_hook"]) if isinstance(info.get("target_hook"), dict) else None
        trainer.callbacks.append(E.PeriodicEval(trainer, loaded[0], loaded[1], hook, every, target_hook=target))


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
    d_out = getattr(data, "d_out", None)
    if d_out is not None:  # transcoder pairs: d_in and d_out come from the data
        sae_kwargs["d_out"] = d_out
    if settings.get("skip_connection"):  # a skip-transcoder (sparsify allows the skip on an SAE too, and so do we)
        sae_kwargs["skip_connection"] = True
    activation = settings["activation"]
    decay = settings["lr_decay_steps"]
    try:
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
    except ValueError as exc:  # the settings' own checks (SAEConfig, TrainConfig) name the value
        raise UsageError(str(exc)) from exc
    torch.manual_seed(settings["seed"])
    if shards > 1:  # each rank initialises only its slice (the whole SAE may not fit one device)
        from fusedsae.sharding import ProcessGrid, ShardedAutoencoder

        sae = ShardedAutoencoder(cfg, ProcessGrid(shards))
    else:
        sae = SparseAutoencoder(cfg)
    try:
        return Trainer(sae, data, train_cfg)
    except ValueError as exc:  # a setting the trainer refuses (e.g. --batch-size too small for AuxK)
        raise UsageError(str(exc)) from exc


def _live_source(spec: str, settings: dict[str, Any], rank: int, world: int):
    """``live:<model>:<layer>[,<layer>…]``: z of those attention layers (one forward pass, side by side), or
    ``live:<model>:<module>[:input|:output]`` that tensor, captured while training from the text of
    --text/--dataset/--split (default: the pydoc text); with --target-hook, (x, y) pairs of one forward pass."""
    from fusedsae.cache import LiveSource
    from fusedsae.data import parse_live_spec, parse_target_hook
    from fusedsae.texts import describe

    name, layers, hook = parse_live_spec(spec)  # a malformed spec: one DataError line with the expected forms
    target = parse_target_hook(settings["target_hook"]) if settings.get("target_hook") else None
    if target is not None and layers is not None and len(layers) > 1:
        raise UsageError(f"--target-hook: a transcoder reads one tensor; --data {spec} names {len(layers)} layers")
    model, tokenizer = _load_model(name)
    n_heads, where = None, {}
    if layers is not None:
        found = [_attention_hooks(model, layer) for layer in layers]
        hook = [h.z for h in found] if len(found) > 1 else found[0].z
        n_heads = found[0].n_heads
        where = {"layer": layers if len(layers) > 1 else layers[0]}
    text = {k: settings.get(k, v) for k, v in _TEXT_DEFAULTS.items()}
    try:
        return LiveSource(
            model,
            tokenizer,
            _select_texts(text),
            hook,
            settings["batch_size"],
            n_heads=n_heads,
            seed=settings["seed"],
            rank=rank,
            world_size=world,
            info={"model": name, **where, **describe(**text)},
            target_hook=target,
        )
    except ValueError as exc:  # a module the model does not have, a layout it cannot tell
        raise UsageError(f"--data {spec}: {exc}") from exc


def _source_metadata(source: Any) -> dict[str, Any]:
    """SAELens metadata keys (model_name, hook_name) of a cached data source, for the SAE's cfg.json."""
    info = source.describe() if hasattr(source, "describe") else {}
    out = {}
    if "model" in info:
        out["model_name"] = info["model"]
    if isinstance(info.get("hook"), dict):
        out["hook_name"] = info["hook"]["module"]
        out["hook_spec"] = info["hook"]  # module, input/output, layout: what `fusedsae eval` splices
    if isinstance(info.get("target_hook"), dict):  # a transcoder's y (SAELens: hook_name_out)
        out["hook_name_out"] = info["target_hook"]["module"]
        out["target_hook_spec"] = info["target_hook"]
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
        raise UsageError(str(exc)) from exc


def _load_model(name: str, device: str = "cpu", with_head: bool = False) -> tuple[Any, Any]:
    """:func:`fusedsae.data.load_model` (a model that cannot be loaded is one :class:`DataError` line);
    ``with_head=True`` keeps its language-model head, for spliced-in evaluation."""
    from fusedsae import capture
    from fusedsae.data import DataError, load_model

    if not with_head:
        return load_model(name, device=device)
    try:
        return capture.load_model(name, device=device, with_head=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load model {name!r} ({reason}); use 'minilm' (the offline MiniLM-L6) or a local model folder"
        ) from exc


def _add_model_args(p: argparse.ArgumentParser, text_default: str | None) -> None:
    model = p.add_argument_group("model and text")
    model.add_argument(
        "--model",
        default=None if text_default is None else "minilm",
        help="transformers model: 'minilm' (offline MiniLM-L6, the default) or a local folder",
    )
    model.add_argument(
        "--layer",
        type=non_negative_int_or_list,
        default=None,
        help="attention layer whose z (input of the output projection) to use, for BERT-like models and GPT-2 "
        "(cache: 1,3,5 captures several layers from one forward pass)",
    )
    _add_text_args(model, text_default or "pydoc")
    model.add_argument("--max-length", type=positive_int, default=128, help="tokens per text at most")
    model.add_argument("--device", default="cpu", help="device of the model")
    model.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    _add_common_args(p)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="cache folder (an interrupted capture into it resumes)")
    _add_model_args(p, "pydoc")
    hook = p.add_argument_group("hook (instead of --layer)")
    hook.add_argument("--hook", default=None, help="module path, e.g. encoder.layer.3.attention.output.dense")
    hook.add_argument("--io", default="input", choices=["input", "output"], help="the module's input or output")
    hook.add_argument("--n-heads", type=positive_int, help="heads in the hooked tensor (enables attribution)")
    hook.add_argument(
        "--target-hook",
        default=None,
        help="a pair cache for transcoders: also capture y, this tensor of the same forward pass, "
        "MODULE[:input|:output] (default output), e.g. encoder.layer.3.output.dense; rows are [x | y]",
    )
    p.add_argument("--max-tokens", type=positive_int, help="stop after the texts holding this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass")
    p.add_argument("--shard-tokens", type=positive_int, default=65536, help="rows per shard, at least")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache in --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_hook(args: argparse.Namespace, model: Any) -> tuple[Any, int | None, dict[str, Any]]:
    from fusedsae.capture import HookSpec

    if args.hook:
        return HookSpec(args.hook, args.io), args.n_heads, {}
    if args.layer is None:
        raise UsageError("give --layer (attention z of that layer) or --hook (any module path)")
    if isinstance(args.layer, list):  # several layers from one forward pass, side by side
        found = [_attention_hooks(model, layer) for layer in args.layer]
        return [h.z for h in found], found[0].n_heads, {"layer": args.layer}
    hooks = _attention_hooks(model, args.layer)
    return hooks.z, hooks.n_heads, {"layer": args.layer}


def _hooks_text(hook: Any) -> str:
    hooks = hook if isinstance(hook, list) else [hook]
    return ("hook " if len(hooks) == 1 else "hooks ") + ", ".join(f"{h.module} ({h.io})" for h in hooks)


def cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from fusedsae.cache import write_cache
    from fusedsae.capture import texts_up_to
    from fusedsae.texts import describe

    if args.threads:
        torch.set_num_threads(args.threads)
    from fusedsae.data import parse_target_hook

    model, tokenizer = _load_model(args.model, device=_resolve_device(args.device, 0))
    hook, n_heads, extra = _model_hook(args, model)
    target = parse_target_hook(args.target_hook) if args.target_hook else None
    if target is not None and isinstance(hook, list):
        raise UsageError(f"--target-hook: a transcoder reads one tensor; --layer {args.layer} names several layers")
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
            target_hook=target,
        )
    except ValueError as exc:  # a cache in the way (CacheError), a --hook the model does not have, its layout
        raise UsageError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    pair = f" + d_out={cache.d_out} (pairs [x | y])" if cache.d_out is not None else ""
    print(
        f"cache {cache.path}: {cache.rows:,} tokens x d_in={cache.d_in}{pair} ({cache.dtype}) in {cache.n_shards} "
        f"shard(s) from {len(texts)} texts; "
        + (_hooks_text(hook) if target is None else f"x: {_hooks_text(hook)}, y: {_hooks_text(target)}")
        + (f", {n_heads} heads" if n_heads else "")
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
        "--max-tokens", type=positive_int, default=None, help="tokens to scan (default: the whole cache, or 20000 live)"
    )
    p.add_argument("--features", default=None, help="comma-separated feature ids (default: the --top most frequent)")
    p.add_argument("--top", type=positive_int, default=5, help="how many features when --features is not given")
    p.add_argument("--contexts", type=positive_int, default=5, help="top-activating contexts per feature")
    p.add_argument("--convention", default="raw", choices=["raw", "centred"])
    p.add_argument(
        "--no-model",
        action="store_true",
        help="with --cache: do not run the model (only its tokenizer, for contexts; no per-source breakdown)",
    )
    p.add_argument("--out", default=None, help="folder for attribution.json and PNGs (default: next to the SAE)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def _check_width(args: argparse.Namespace, sae: Any, width: int | None, where: str) -> None:
    """An SAE reads activations of its own width: a mismatch is the user's choice of SAE or data, said first (a
    later check would blame a symptom, such as the number of heads)."""
    if width is not None and int(width) != sae.cfg.d_in:
        raise UsageError(
            f"{args.sae} takes d_in={sae.cfg.d_in} activations but {where} gives {width}; use an SAE trained on "
            "this data (or the data it was trained on)"
        )


def _attention_hooks(model: Any, layer: int) -> Any:
    from fusedsae.capture import attention_hooks

    try:
        return attention_hooks(model, layer)
    except ValueError as exc:  # a layer the model does not have, or a model whose attention it cannot find
        raise UsageError(f"--layer {layer}: {exc}") from exc


def cmd_attribute(args: argparse.Namespace) -> int:
    import torch

    from fusedsae.analysis import report as R
    from fusedsae.formats import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    if isinstance(args.layer, list):
        raise UsageError(f"attribute reads one layer; got --layer {','.join(map(str, args.layer))} (give one)")
    sae = load_sae(args.sae, device=_resolve_device(args.device, 0)).eval()
    requested = None
    if args.features:  # checked before the scan, which can take minutes
        try:
            requested = [int(f) for f in args.features.split(",")]
        except ValueError as exc:
            raise UsageError(f"--features {args.features!r}: expected comma-separated integers") from exc
        bad = [f for f in requested if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise UsageError(f"--features {bad} out of range: the SAE has d_sae={sae.cfg.d_sae}")
    model = tokenizer = hooks = None
    z_of_row = None
    if args.cache:
        from fusedsae.cache import ActivationCache

        cache = ActivationCache(args.cache)
        if cache.d_out is not None:
            raise UsageError(
                f"{args.cache} holds transcoder (x, y) pairs; attribute reads a one-hook cache (capture x alone, or "
                "scan live text with --layer)"
            )
        _check_width(args, sae, cache.d_in, f"the cache {args.cache}")
        info = cache.source
        model_name = args.model or info.get("model")
        layer = args.layer if args.layer is not None else info.get("layer")
        if "hooks" in info:
            raise UsageError(f"{args.cache} holds several hooks side by side; attribute reads a one-hook cache")
        n_heads = sae.cfg.n_heads or cache.n_heads
        batches, text_tokens, z_of_row = R.cache_reader(cache, args.max_tokens)
        if model_name is None:
            raise UsageError(f"{args.cache} does not say which model wrote it; give --model (its tokenizer is needed)")
        from fusedsae.data import load_model

        model, tokenizer = load_model(model_name, device=_resolve_device(args.device, 0))
        if args.no_model or layer is None:
            model = None
        else:
            hooks = _attention_hooks(model, layer)
    else:
        from fusedsae.data import load_model

        if args.layer is None:
            raise UsageError("give --cache, or --layer with --model (default minilm) to capture live")
        model, tokenizer = load_model(args.model or "minilm", device=_resolve_device(args.device, 0))
        _check_width(args, sae, getattr(model.config, "hidden_size", None), f"model {args.model or 'minilm'}")
        hooks = _attention_hooks(model, args.layer)
        n_heads = sae.cfg.n_heads or hooks.n_heads
        from fusedsae.capture import texts_up_to

        texts = texts_up_to(tokenizer, _select_texts(_text_settings(args)), args.max_tokens or 20000, args.max_length)
        batches, text_tokens = R.live_reader(model, tokenizer, hooks, texts, args.max_length)
    if n_heads is None:
        raise UsageError(f"{args.sae} has no n_heads and the data does not say it; attribution needs head-major z")
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
    atomic_write(out / "attribution.json", json.dumps(R.to_json(reports), indent=1) + "\n")
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
        "--steps", type=positive_int, default=None, help="optimizer steps per SAE (default 600; the composed lab: 2000)"
    )
    p.add_argument("--seeds", type=positive_int, default=8, help="composed lab: SAEs per cell, batched (default 8)")
    p.add_argument(
        "--toy",
        choices=["plus", "trained", "retrained"],
        default="plus",
        help="composed lab: the idealised + (default), a toy model trained at q = 0, or one retrained per cell",
    )
    p.add_argument("--l1-coefficient", type=float, default=0.1, help="composed lab: ReLU + L1 (default 0.1)")
    p.add_argument("--quick", action="store_true", help="composed lab: 2 seeds, 300 steps (a smoke test)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, … or auto")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--out", default="runs/toy-experiments", help="writes <experiment>.json and .png here")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    _add_common_args(p)


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
        atomic_write(written[0], json.dumps(record, indent=2) + "\n")
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
    model.add_argument("--max-tokens", type=positive_int, default=20000, help="evaluate on this many tokens")
    model.add_argument("--max-length", type=positive_int, default=128, help="tokens per text at most")
    model.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass")
    model.add_argument("--device", default="cpu", help="device of the model and the SAEs")
    model.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    hook = p.add_argument_group("hook (default: the one the SAE was trained on, from its metadata)")
    hook.add_argument("--hook", default=None, help="module path, e.g. encoder.layer.3.attention.output.dense")
    hook.add_argument("--io", default="input", choices=["input", "output"], help="the module's input or output")
    hook.add_argument(
        "--target-hook",
        default=None,
        help="transcoders: the tensor whose value the transcoder's output replaces, MODULE[:input|:output] "
        "(default output; default: from the transcoder's metadata)",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plot")
    _add_common_args(p)


def _eval_name(folder: str, taken: set[str]) -> str:
    path = Path(folder).resolve()
    name = path.parent.name if path.name == "sae" else path.name
    return name if name not in taken else str(folder)


def _eval_target_hook(args: argparse.Namespace, folder: str, sae: Any, recorded: dict[str, Any]) -> Any:
    """A transcoder's y (the tensor its output replaces): --target-hook, else what its metadata records; None for an
    SAE (which takes no --target-hook)."""
    from fusedsae.capture import HookSpec
    from fusedsae.data import parse_target_hook

    transcoder = getattr(sae.cfg, "d_out", None) is not None
    if args.target_hook and not transcoder:
        raise UsageError(f"--target-hook: {folder} is an SAE (it reconstructs its own input), not a transcoder")
    if not transcoder:
        return None
    if args.target_hook:
        return parse_target_hook(args.target_hook)
    if isinstance(recorded.get("target_hook"), dict):
        return HookSpec.from_dict(recorded["target_hook"])
    raise UsageError(
        f"{folder} is a transcoder that does not record which tensor it reconstructs; give --target-hook "
        "MODULE[:input|:output]"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fusedsae import evals as E
    from fusedsae.capture import HookSpec, texts_up_to
    from fusedsae.formats import load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device, 0)
    targets, models = [], set()
    for folder in args.sae:
        sae = load_sae(folder, device=device).eval()  # an SAEFormatError is one line (main)
        recorded = E.recorded_source(sae)
        if args.hook:
            hook = HookSpec(args.hook, args.io)
        elif isinstance(recorded.get("hook"), dict):
            hook = HookSpec.from_dict(recorded["hook"])
        else:
            raise UsageError(f"{folder} does not record which tensor it was trained on; give --hook and --io")
        target = _eval_target_hook(args, folder, sae, recorded)
        models.add(args.model or recorded.get("model"))
        targets.append(E.Target(_eval_name(folder, {t.name for t in targets}), sae, hook, target))
    if None in models:
        raise UsageError("an SAE does not record its model; give --model (a name or a local folder)")
    if len(models) > 1:
        raise UsageError(f"the SAEs come from different models ({', '.join(sorted(models))}); evaluate one at a time")
    model_name = models.pop()
    model, tokenizer = _load_model(model_name, device=device, with_head=True)
    text = _text_settings(args)
    texts = texts_up_to(tokenizer, _select_texts(text), args.max_tokens, args.max_length)
    batches = E.text_batches(tokenizer, texts, args.batch_size, args.max_length)
    if E.model_head(model) == "masked":
        batches = E.mask_for_mlm(batches, tokenizer.mask_token_id)
    try:
        result = E.evaluate(model, batches, targets)
    except ValueError as exc:  # an SAE whose width does not match its hook, no tokens to evaluate on
        raise UsageError(str(exc)) from exc
    result.info.update(model=model_name, **{k: v for k, v in text.items() if v is not None})
    print(
        f"{result.n_tokens:,} tokens of {result.n_texts} texts ({args.text if not args.dataset else args.dataset}, "
        f"split {args.split}); model {model_name} ({result.head if result.head != 'none' else 'no'} LM head)"
    )
    print(result.table())
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result.to_dict(), indent=2) + "\n")
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "info": cmd_info,
    "cache": cmd_cache,
    "attribute": cmd_attribute,
    "toy": cmd_toy,
    "eval": cmd_eval,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (each names what and the fix): one line, not a traceback.
    ``OSError`` is the file system refusing a path the user gave (a file where --out wants a folder, no permission,
    a full disk); its message names the path. Imported here, not at the top, so that ``--help`` and ``--version``
    do not load torch."""
    from fusedsae.cache import CacheError
    from fusedsae.checkpoint import CheckpointError, RunFolderError
    from fusedsae.data import DataError
    from fusedsae.formats import SAEFormatError
    from fusedsae.training import TrainingDiverged

    run = (CheckpointError, RunFolderError, TrainingDiverged)
    return (UsageError, DataError, CacheError, SAEFormatError, *run, OSError)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status. A user's mistake raises ``SystemExit`` with one line
    (``fusedsae <command>: error: …``; exit status 1), a bad option exits 2 with one line; ``--debug`` re-raises
    the original exception instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = _typed_options(build_parser(), argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        raise SystemExit(f"fusedsae {args.command}: interrupted") from None
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors()):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise SystemExit(f"fusedsae {args.command}: error: {message}") from None


if __name__ == "__main__":
    sys.exit(main())
