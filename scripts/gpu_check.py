"""The one-shot GPU check's measurements (``scripts/gpu_check.sh`` runs this after installing and testing).

    python scripts/gpu_check.py --work DIR [--sections bench,configs,graph] [--dtype bfloat16] [--budget 300] [--dry]
    python scripts/gpu_check.py --work DIR --render-only

Sections, in the order the shell script runs them (each ordered by what it can falsify, each skipped when the time
budget runs out):

- ``bench``: per DESIGN shape, the benchmark rows users care about, providers side by side: the Trainer's step
  (time, x GEMM, tokens/s, host syncs, peak memory), the step with 20% dead latents, the encoder with and without
  AuxK, the decoder fwd+bwd against copy bandwidth, the encoder backward with uniform and power-law latents.
- ``configs``: the triton encoder's candidate configurations (``CANDIDATE_CONFIGS``, when the kernels expose them)
  timed side by side against the GEMM, each checked to select the same latents as the default.
- ``graph``: the TopK training step (Trainer settings, 20% dead) captured in a CUDA graph and replayed: same result
  as eager, and time of replay vs eager. Its own process: a failed capture can leave the CUDA context unusable.

Every result is appended to ``DIR/results.jsonl`` as it lands and the report (JSON + markdown, with device,
versions and commit) is rewritten after each section, so a killed run still reports. On a GPU the report goes to
``benchmarks/results/gpu-check-<device>-<commit>.{json,md}``; with ``--dry`` (CPU, Triton's interpreter, tiny
shapes: the plumbing only) to ``DIR``. Both are copied to ``$OUT`` when it is set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import inspect
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("bench", "configs", "graph")
DTYPES = ("bfloat16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check", help="results.jsonl and logs")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; sections that would overrun are skipped")
    ap.add_argument("--dry", action="store_true", help="CPU + TRITON_INTERPRET=1 at tiny shapes (plumbing only)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the report from results.jsonl and exit")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    return args


ARGS = parse_args()
if ARGS.dry:
    # read by triton when fusedsae.kernels is first imported (at the first dispatch), so set before any import
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import providers  # noqa: E402
import report  # noqa: E402
from fusedsae.diagnostics import count_host_syncs  # noqa: E402
from providers import Case  # noqa: E402

T0 = time.monotonic()
ERRORS = 0  # errors recorded by this run: the exit status (in the dry run an error is a bug in this script)
DEV = "cpu" if ARGS.dry else "cuda"
WORK: Path = ARGS.work
LOG = WORK / "results.jsonl"

# (d_in, d_sae, k) and tokens: docs/architecture.md#targets on a GPU; in the dry run one tiny shape, no multiple of any
# block (the interpreter runs a Triton training step there in ~6 s of CPU: every row is one call, so CI stays under 2
# minutes)
SHAPES = [(24, 200, 5)] if ARGS.dry else [(768, 32768, 32), (4096, 131072, 64)]
TOKENS = 40 if ARGS.dry else 16384
STEP_PROVIDERS = ("triton", "cuda", "reference", "torch-unfused", "sparsify", "sae-lens")
OP_PROVIDERS = ("triton", "cuda", "reference", "torch-unfused")


DEADLINE: float | None = None  # the current case's share of the budget (monotonic time), when one is set


def left() -> float:
    """Seconds left: of the whole budget, or of the current case's share when that ends first."""
    total = ARGS.budget - (time.monotonic() - T0)
    return total if DEADLINE is None else min(total, DEADLINE - time.monotonic())


def emit(kind: str, **record) -> None:
    """Appends one record to results.jsonl (and prints it): rows, profiles, errors, section notes."""
    global ERRORS
    ERRORS += kind == "error"
    record = {"kind": kind, "t": round(time.monotonic() - T0, 1), **record}
    line = json.dumps(record, default=str)
    print(line[:400], flush=True)
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def case_for(d_in: int, d_sae: int, k: int, dtype: str) -> Case:
    return Case(f"{d_in}x{d_sae}-k{k}-{dtype}", TOKENS, d_in, d_sae, k, getattr(torch, dtype), DEV)


def free() -> None:
    providers.release()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------------------------------------------
# timing
# -----------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], None]) -> tuple[float, float, int]:
    """(median s, min s, rounds): one warm-up call (compiles), then rounds until ~1 s of calls (3..15 rounds). In
    the dry run one call, no warm-up. ``fn`` waits for the device itself."""
    if ARGS.dry:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, time.perf_counter() - t, 1
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    rounds = max(3, min(15, int(1.0 / max(first, 1e-4))))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), rounds


def cuda_syncs_seen(fn: Callable[[], None]) -> int | None:
    """Synchronisations CUDA itself reports during one call (``torch.cuda.set_sync_debug_mode``), besides the
    dispatch-level count; None off CUDA."""
    if DEV != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(suite: str, case: Case, provider: str, build: Callable[[], Callable[[], None]], **kw) -> None:
    """Builds and times one (suite, case, provider); a provider that cannot run here is recorded as skipped, one
    that fails as an error, and the check goes on."""
    profile = kw.pop("profile", False)
    fn = None
    try:
        fn = build()
        if ARGS.dry and profile:
            # one warm-up (a Trainer's first step reads its dead-latent bound on the host, as it does once per
            # refresh interval), then one call timed and counted at once: the interpreter is slow
            fn()
            t = time.perf_counter()
            with providers.as_on_a_gpu():
                syncs = count_host_syncs(fn)
            median = low = time.perf_counter() - t
            rounds, extra = 1, {"host_syncs": syncs.count, "sync_ops": dict(syncs.by_op)}
        else:
            median, low, rounds = timed(fn)
            extra = providers.step_profile(fn, case.device) if profile else {}
        if profile and DEV == "cuda":
            extra["cuda_syncs_seen"] = cuda_syncs_seen(fn)
        emit("row", **report.make_row(suite, case, provider, median, low, rounds, **kw, **extra))
    except BaseException as exc:  # pytest.skip raises a BaseException (Skipped); KeyboardInterrupt must stop us
        if isinstance(exc, KeyboardInterrupt):
            raise
        skipped = type(exc).__name__ == "Skipped"
        emit(
            "skip" if skipped else "error",
            suite=suite,
            case=case.name,
            provider=provider,
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
            tb=None if skipped else traceback.format_exc()[-1500:],
        )
    finally:
        del fn
        gc.collect()  # the closures hold an SAE, its optimizer state and inputs (~9 GiB at 4096 -> 131072)
        if DEV == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def section(name: str, need_s: float) -> Iterator[bool]:
    """Runs the body if ``need_s`` seconds are left (yields whether it runs); records the section's time and any
    error, then rewrites the report."""
    if left() < need_s:
        emit("section", name=name, skipped=f"{left():.0f} s left < {need_s:.0f} s needed")
        yield False
        return
    start = time.monotonic()
    try:
        yield True
    except Exception as exc:  # keep going: the next section may still teach something
        emit("error", suite=name, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-2000:])
    emit("section", name=name, seconds=round(time.monotonic() - start, 1))
    render()


# -----------------------------------------------------------------------------------------------------------------
# sections
# -----------------------------------------------------------------------------------------------------------------


def bench_case(case: Case) -> None:
    """The benchmark rows for one case, most decisive first (the step), each skipped once time runs short."""
    emit("profile", case=case.name, **providers.realistic(case).profile)
    measure(report.FLOOR, case, "gemm", lambda: providers.gemm(case), flops=case.gemm_flops)
    cp = providers.copy(case)
    measure(report.FLOOR, case, "copy", lambda: cp, nbytes=cp.bytes)
    plan: list[tuple[str, str, Callable[[], Callable[[], None]], dict]] = []
    for p in STEP_PROVIDERS:
        plan.append((report.STEP, p, lambda p=p: providers.train_step(p, case), {"profile": True}))
    for p in providers.FUSEDSAE_PROVIDERS:
        build = lambda p=p: providers.train_step(p, case, dead_fraction=0.2)  # noqa: E731
        plan.append((report.STEP_DEAD, p, build, {"profile": True}))
    for aux, suite in ((False, report.ENCODER), (True, report.ENCODER_AUX)):
        for p in OP_PROVIDERS:
            plan.append(
                (suite, p, lambda p=p, aux=aux: providers.encoder_topk(p, case, aux), {"flops": case.gemm_flops})
            )
    for latents in report.LATENTS:
        for p in OP_PROVIDERS:
            build = lambda p=p, lat=latents: providers.decoder_fwd_bwd(p, case, lat)  # noqa: E731
            plan.append(
                (report.suite_name(report.DECODER, latents), p, build, {"nbytes": providers.decoder_bytes(case)})
            )
    for latents in report.LATENTS:
        for p in OP_PROVIDERS:
            build = lambda p=p, lat=latents: providers.encoder_backward(p, case, lat)  # noqa: E731
            plan.append((report.suite_name(report.ENC_BWD, latents), p, build, {}))
    # a row at the 4096 -> 131072 shape takes ~1-5 s on an H200 (compiles excluded); keep a margin for the report
    need = 2.0 if ARGS.dry else 8.0
    for suite, provider, build, kw in plan:
        if left() < need:
            emit("skip", suite=suite, case=case.name, provider=provider, error=f"time budget: {left():.0f} s left")
            continue
        measure(suite, case, provider, build, **kw)


@contextlib.contextmanager
def _set_then_reset(setter: Callable[[str | None], None], name: str) -> Iterator[None]:
    setter(name)
    try:
        yield
    finally:
        setter(None)


@contextlib.contextmanager
def _environment_variable(var: str, name: str) -> Iterator[None]:
    saved = os.environ.get(var)
    os.environ[var] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved


def encoder_candidates() -> tuple[list[str], Callable[[str], contextlib.AbstractContextManager] | None, str]:
    """Finds the triton encoder's candidate configurations and a way to force one, wherever the kernels expose
    them (the interface was being written alongside this script, so it is discovered, not assumed): a
    ``CANDIDATE_CONFIGS`` table (dict name -> config, or a list of named configs) in ``fusedsae.backends.triton``
    (module or package), ``fusedsae.backends.triton.encoder`` or ``fusedsae.kernels.encoder``; forced by a context
    manager taking the name (``use_encoder_config``, ``use_config``, ``force_config``), else a setter taking the
    name and None to reset (``set_encoder_config``), else the ``FUSEDSAE_ENCODER_CONFIG`` environment variable read
    at each launch (an ``encoder_config()`` getter without arguments says it is). Returns (names, force(name) ->
    context manager, how they were found)."""
    for modname in ("fusedsae.backends.triton", "fusedsae.backends.triton.encoder", "fusedsae.kernels.encoder"):
        try:
            mod = importlib.import_module(modname)
        except Exception:  # a module that is missing or fails to import is an answer
            continue
        table = getattr(mod, "CANDIDATE_CONFIGS", None)
        if not table:
            continue
        if isinstance(table, dict):
            names = [str(name) for name in table]
        else:
            names = [str(getattr(c, "name", None) or (c.get("name") if isinstance(c, dict) else c)) for c in table]
        found = f"{modname}.CANDIDATE_CONFIGS"
        for fname in ("use_encoder_config", "use_config", "force_config"):
            if callable(getattr(mod, fname, None)):
                return names, getattr(mod, fname), f"{found} + {modname}.{fname}"
        setter = getattr(mod, "set_encoder_config", None)
        if callable(setter):
            force = functools.partial(_set_then_reset, setter)
            return names, force, f"{found} + {modname}.set_encoder_config"
        if callable(getattr(mod, "encoder_config", None)):
            force = functools.partial(_environment_variable, "FUSEDSAE_ENCODER_CONFIG")
            return names, force, f"{found} + FUSEDSAE_ENCODER_CONFIG"
        return names, None, f"{found}, but no function to force one"
    return [], None, "no CANDIDATE_CONFIGS table in fusedsae.backends.triton or fusedsae.kernels.encoder"


def configs_case(case: Case) -> None:
    """Times each candidate encoder configuration on the realistic batch (the same call as the encoder row) and
    checks that it selects the same latents as the default configuration. The dry run tries the first two (each
    is several seconds in the interpreter): the plumbing, not the kernels."""
    from fusedsae import backends
    from fusedsae import functional as F

    names, force, how = encoder_candidates()
    emit("configs", case=case.name, found=how, names=names)
    if not names or force is None:
        return
    x = providers.realistic(case).x
    sae = providers.make_sae(case)
    args = (x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    providers.require_backend("triton", "topk_encode", *args, case.k, 0, None)
    with backends.use("triton"):
        default = F.topk_encode(*args, k=case.k).indices.sort(1).values
    gemm_s = timed(providers.gemm(case))[0]
    for name in names[:2] if ARGS.dry else names:
        if left() < (2 if ARGS.dry else 10):
            emit("skip", suite="encoder config", case=case.name, provider=name, error="time budget")
            continue

        def run(name=name) -> None:
            with force(name), backends.use("triton"):
                F.topk_encode(*args, k=case.k)
            providers.synchronize(case.device)

        try:
            with force(name), backends.use("triton"):
                got = F.topk_encode(*args, k=case.k).indices.sort(1).values
            same = float((got == default).all(1).double().mean())
            median, low, rounds = timed(run)
            emit(
                "row",
                **report.make_row("encoder config", case, name, median, low, rounds, flops=case.gemm_flops),
                over_gemm=round(median / gemm_s, 3),
                same_selection_rows=same,
            )
        except Exception as exc:  # one bad configuration must not stop the others
            emit("error", suite="encoder config", case=case.name, provider=name, error=f"{type(exc).__name__}: {exc}")


def _state(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step changes: parameters, buffers and the optimizer's state."""
    tensors = list(sae.parameters()) + list(sae.buffers())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return tensors


def graph_case(case: Case, provider: str) -> None:
    """Captures the TopK step (Trainer settings: AuxK at the default aux_k over 20% dead latents, normalised
    decoder, finite check, clipping, fused capturable Adam) in a CUDA graph, replays it, and compares one replay
    with one eager step from the same state. In the dry run there is no graph: the "replay" is the eager step,
    which checks the plumbing (state snapshot, comparison, report) and nothing else."""
    from fusedsae import backends

    x = providers.realistic(case).x
    dead = providers.dead_mask(case, 0.2)
    sae = providers.make_sae(case)
    providers.require_backend(provider, "topk_encode", x, sae.W_enc, sae.b_enc, sae.b_dec, case.k, 0, None)
    capturable = DEV == "cuda"
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4, fused=True, capturable=capturable)

    # A step that may be captured has static shapes and leaves its checks on the device: where training_forward
    # takes them (the sync-free step), the dead list's static size is read here, before the capture, and the
    # finite check is deferred as the Trainer defers it to its log steps.
    accepted = inspect.signature(sae.training_forward).parameters
    options = {"dead_capacity": int(dead.sum()), "defer_checks": True}
    options = {k: v for k, v in options.items() if k in accepted}

    def step() -> torch.Tensor:
        with backends.use(provider):
            out = sae.training_forward(x, dead_mask=dead, **options)
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.normalize_decoder_rows()
        return out.loss.detach()

    def eager() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)  # keep the .grad tensors the graph captured
        loss = step()
        providers.synchronize(case.device)
        return loss

    # warm-up (compiles, allocates .grad and the optimizer state) on a side stream, as torch.cuda.graphs asks
    if DEV == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            for p in sae.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            static_loss = step()

        def replay() -> torch.Tensor:
            graph.replay()
            torch.cuda.synchronize()
            return static_loss
    else:
        eager()
        replay = eager
    state = _state(sae, opt)
    start = [t.detach().clone() for t in state]
    loss_g = replay().clone()
    after_g = [t.detach().clone() for t in state]
    with torch.no_grad():
        for t, s in zip(state, start):
            t.copy_(s)
    loss_e = eager().clone()
    worst = max(float((a.double() - t.detach().double()).abs().max()) for a, t in zip(after_g, state) if a.numel())
    bitwise = all(torch.equal(a, t) for a, t in zip(after_g, state))
    if ARGS.dry:  # no graph to time; the plumbing above is what the dry run checks
        eager_s = replay_s = float("nan")
    else:
        eager_s = timed(lambda: eager())[0]
        replay_s = timed(lambda: replay())[0]
    emit(
        "graph",
        case=case.name,
        provider=provider,
        options=sorted(options),
        captured=DEV == "cuda",
        loss_replay=float(loss_g),
        loss_eager=float(loss_e),
        max_abs_state_diff=worst,
        bitwise_equal=bitwise,
        eager_ms=round(eager_s * 1e3, 3),
        replay_ms=round(replay_s * 1e3, 3),
        replay_speedup=round(eager_s / replay_s, 3),
    )


# -----------------------------------------------------------------------------------------------------------------
# the report
# -----------------------------------------------------------------------------------------------------------------


def read_log() -> list[dict]:
    if not LOG.exists():
        return []
    out = []
    for line in LOG.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut off by a kill
    return out


def notes(records: list[dict]) -> tuple[str, str]:
    """The markdown for everything that is not a benchmark row: the shell's steps (install, tests), the graph
    check and the encoder configurations; then (the appendix) skips, errors and sections cut by the budget."""
    parts = []
    steps = [r for r in records if r["kind"] == "step"]
    if steps:
        parts += ["**steps**\n", "| step | exit | seconds | last lines |", "|---|---:|---:|---|"]
        for s in steps:
            tail = " / ".join(line.strip() for line in str(s.get("tail", "")).splitlines()[-3:])
            parts.append(f"| {s['name']} | {s['rc']} | {s.get('seconds', '')} | {tail.replace('|', '/')[:300]} |")
    graphs = [r for r in records if r["kind"] == "graph"]
    if graphs:
        parts += [
            "\n**CUDA graph replay of the training step** (Trainer settings, 20% dead)\n",
            "| case | provider | captured | bitwise equal | max abs state diff | eager ms | replay ms | speed-up |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for g in graphs:
            parts.append(
                f"| {g['case']} | {g['provider']} | {g['captured']} | {g['bitwise_equal']} | "
                f"{g['max_abs_state_diff']:.3g} | {g['eager_ms']} | {g['replay_ms']} | {g['replay_speedup']} |"
            )
    for c in (r for r in records if r["kind"] == "configs"):
        parts.append(f"\nencoder configurations at {c['case']}: {c['found']} ({len(c['names'])} found)")
    cfg_rows = [r for r in records if r["kind"] == "row" and r["suite"] == "encoder config"]
    if cfg_rows:
        parts += ["\n| case | config | median ms | x GEMM | same selection |", "|---|---|---:|---:|---:|"]
        for r in cfg_rows:
            parts.append(
                f"| {r['case']} | {r['provider']} | {r['median_s'] * 1e3:.3f} | {r['over_gemm']} | "
                f"{r['same_selection_rows']:.3f} |"
            )
    problems = [r for r in records if r["kind"] in ("error", "skip") or (r["kind"] == "section" and "skipped" in r)]
    appendix = []
    if problems:
        appendix += ["\n**skipped and failed**\n", "| what | case | provider | why |", "|---|---|---|---|"]
        for r in problems:
            what = r.get("suite") or r.get("name", "")
            why = (r.get("error") or r.get("skipped") or "").replace("|", "/").replace("\n", " ")[:200]
            appendix.append(f"| {r['kind']}: {what} | {r.get('case', '')} | {r.get('provider', '')} | {why} |")
    return "\n".join(parts), "\n".join(appendix)


def render() -> list[Path]:
    """Rewrites the report from results.jsonl: ``benchmarks/results/gpu-check-*`` on a GPU, ``WORK`` in the dry
    run; copies to ``$OUT`` when set."""
    records = read_log()
    env = next((r["environment"] for r in reversed(records) if r["kind"] == "env"), None) or report.environment(DEV)
    rows = [{k: v for k, v in r.items() if k not in ("kind", "t")} for r in records if r["kind"] == "row"]
    rows = [r for r in rows if r["suite"] != "encoder config"]
    profiles = {
        r["case"]: {k: v for k, v in r.items() if k not in ("kind", "t", "case")}
        for r in records
        if r["kind"] == "profile"
    }
    target = WORK if ARGS.dry else report.RESULTS
    stem = target / f"gpu-check-{report.slug(env)}"
    top, appendix = notes(records)
    extra = {
        "notes": top,
        "appendix": appendix,
        "steps": [r for r in records if r["kind"] == "step"],
        "graph": [r for r in records if r["kind"] == "graph"],
        "encoder_configs": [r for r in records if r["kind"] == "configs"]
        + [r for r in records if r["kind"] == "row" and r.get("suite") == "encoder config"],
        "problems": [r for r in records if r["kind"] in ("error", "skip")],
    }
    paths = report.write(stem, env, rows, profiles, "fusedsae GPU check" + (" (dry run)" if ARGS.dry else ""), **extra)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for p in [*paths, LOG]:
            shutil.copy(p, Path(out) / p.name)
    return paths


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    if ARGS.render_only:
        for p in render():
            print(p)
        return 0
    from fusedsae import backends

    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry to check the script on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if ARGS.dry:
        torch.set_num_threads(2)
    emit(
        "env",
        environment=report.environment(DEV),
        backends={k: [v["available"], v["reason"][:160]] for k, v in backends.report().items()},
        sections=ARGS.sections,
        dtype=ARGS.dtype,
        budget_s=ARGS.budget,
    )
    wanted = ARGS.sections.split(",")
    cases = [case_for(d_in, d_sae, k, ARGS.dtype) for d_in, d_sae, k in SHAPES]
    global DEADLINE
    if "bench" in wanted:
        for i, case in enumerate(cases):
            # each shape gets an equal share of what is left, so the large shape's step rows are not crowded out
            DEADLINE = time.monotonic() + left() / (len(cases) - i)
            with section(f"bench {case.name}", 20 if not ARGS.dry else 3) as run:
                if run:
                    bench_case(case)
            DEADLINE = None
            free()
    if "configs" in wanted:
        for case in cases:
            with section(f"configs {case.name}", 20 if not ARGS.dry else 3) as run:
                if run:
                    configs_case(case)
            free()
    if "graph" in wanted:
        case = cases[0]
        # the dry run checks the plumbing with the reference (the triton step already ran in the bench rows)
        for provider in ("reference",) if ARGS.dry else ("triton", "cuda"):
            with section(f"graph {case.name} {provider}", 30 if not ARGS.dry else 3) as run:
                if run:
                    try:
                        graph_case(case, provider)
                    except BaseException as exc:
                        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ != "Skipped":
                            raise
                        emit("skip", suite="graph", case=case.name, provider=provider, error=str(exc)[:300])
        free()
    for p in render():
        print(f"report: {p}")
    return 1 if ERRORS else 0


if __name__ == "__main__":
    sys.exit(main())
