"""Benchmark results: rows, the environment they were measured in, the side-by-side markdown tables, the ratios
against the targets of docs/architecture.md#targets, and the JSON + markdown files under ``benchmarks/results/``.
Shared by the pytest benchmark session (``conftest.py``) and the one-shot GPU check (``scripts/gpu_check.py``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from providers import FUSEDSAE_PROVIDERS, Case

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# suite names (also the keys the targets read)
FLOOR = "floor"
STEP = "train step (Trainer settings)"
STEP_DEAD = "train step, 20% dead (AuxK)"
ENCODER = "encoder+topk forward"
ENCODER_AUX = "encoder+topk+auxk forward, 20% dead"
DECODER = "decoder fwd+bwd"
ENC_BWD = "encoder backward"
LATENTS = ("uniform", "power-law")


def suite_name(base: str, latents: str | None = None) -> str:
    return f"{base} ({latents} latents)" if latents else base


def make_row(
    suite: str,
    case: Case,
    provider: str,
    seconds: float,
    min_s: float,
    rounds: int,
    flops: float | None = None,
    nbytes: float | None = None,
    **extra,
) -> dict:
    """One measurement: median and minimum seconds over ``rounds``, tokens/s, and TFLOP/s or GB/s when the
    work's FLOPs or bytes are given; ``extra`` (host syncs, peak memory, notes) is kept as is."""
    row = {
        "suite": suite,
        "case": case.name,
        "provider": provider,
        "median_s": seconds,
        "min_s": min_s,
        "rounds": rounds,
        **case.describe(),
        "tokens_per_s": case.n / seconds,
    }
    if flops:
        row["tflops"] = flops / seconds / 1e12
    if nbytes:
        row["gb_per_s"] = nbytes / seconds / 1e9
    row.update(extra)
    return row


def _git(*args: str) -> str:
    try:
        return subprocess.run(("git", *args), capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(dev: str) -> dict:
    """Device, versions, commit and the settings that change what the kernels compute."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    env = {
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else (platform.processor() or "cpu"),
        # settings that change what the kernels compute: TF32 products, and sorted vs atomic gradient sums
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "deterministic": os.environ.get("FUSEDSAE_DETERMINISTIC", "1") != "0",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "device_kind": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        # a copy of the tree without .git (as the lent GPU machines get) names its commit in FUSEDSAE_COMMIT
        "commit": os.environ.get("FUSEDSAE_COMMIT") or _git("rev-parse", "HEAD"),
        "dirty": _git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
    return env


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """Markdown: per (suite, case), each provider's median time, its distance from the floor measured in the same
    run (compute-bound suites: time over the GEMM's; memory-bound ones: bandwidth as a share of the copy's), the
    speed-up over torch-unfused, host syncs per call and peak memory where measured."""
    lines = []
    floors = {r["case"]: r["median_s"] for r in rows if r["provider"] == "gemm"}
    copies = {r["case"]: r["gb_per_s"] for r in rows if r["provider"] == "copy"}
    for suite in dict.fromkeys(r["suite"] for r in rows):
        if suite == FLOOR:
            continue
        for case in dict.fromkeys(r["case"] for r in rows if r["suite"] == suite):
            group = [r for r in rows if r["suite"] == suite and r["case"] == case]
            unfused = next((r["median_s"] for r in group if r["provider"] == "torch-unfused"), None)
            memory_bound = all("gb_per_s" in r for r in group)
            lines += [
                f"\n**{suite}**, {case}\n",
                "| provider | median ms | tokens/s | x GEMM | % copy BW | speed-up vs torch-unfused "
                "| host syncs | peak GiB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in sorted(group, key=lambda r: r["median_s"]):
                floor, copy = floors.get(case), copies.get(case)
                cells = [
                    r["provider"],
                    f"{r['median_s'] * 1e3:.2f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['median_s'] / floor:.2f}" if floor and not memory_bound else "",
                    f"{100 * r['gb_per_s'] / copy:.0f}%" if copy and memory_bound else "",
                    f"{unfused / r['median_s']:.2f}" if unfused else "",
                    str(r["host_syncs"]) if "host_syncs" in r else "",
                    _fmt(r.get("peak_mem_gib"), ".2f"),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    floor_rows = [r for r in rows if r["suite"] == FLOOR]
    if floor_rows:
        lines += ["\n**floors**\n", "| measure | case | median ms | TFLOP/s | GB/s |", "|---|---|---:|---:|---:|"]
        for r in floor_rows:
            lines.append(
                f"| {r['provider']} | {r['case']} | {r['median_s'] * 1e3:.2f} | "
                f"{r.get('tflops', 0):.1f} | {r.get('gb_per_s', 0):.0f} |"
            )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's ratios per case and fusedsae provider, each with its target (docs/architecture.md#targets and issue
    8): step and encoder over the GEMM, speed-ups over torch-unfused and sparsify, decoder bandwidth as a share of the
    copy's, the 20%-dead step over the 0%-dead one, the encoder backward with power-law over uniform latents, the cost
    of AuxK in the encoder, host syncs per step and peak memory against sparsify's."""
    by = {(r["suite"], r["case"], r["provider"]): r for r in rows}
    out: list[dict] = []

    def add(case, provider, name, value, target, ok):
        out.append(
            {
                "case": case,
                "provider": provider,
                "ratio": name,
                "value": None if value is None else round(value, 3),
                "target": target,
                "met": None if value is None or ok(value) is None else bool(ok(value)),
            }
        )

    for case in dict.fromkeys(r["case"] for r in rows):

        def get(suite, provider, key="median_s", case=case):
            r = by.get((suite, case, provider))
            return None if r is None else r.get(key)

        gemm, copy_bw = get(FLOOR, "gemm"), get(FLOOR, "copy", "gb_per_s")
        for p in FUSEDSAE_PROVIDERS:
            step = get(STEP, p)
            if step is not None:
                if gemm:
                    add(case, p, "step / GEMM", step / gemm, "<= 1.7", lambda v: v <= 1.7)
                unfused, sparsify = get(STEP, "torch-unfused"), get(STEP, "sparsify")
                if unfused:
                    add(case, p, "speed-up vs torch-unfused", unfused / step, ">= 5", lambda v: v >= 5)
                if sparsify:
                    add(case, p, "speed-up vs sparsify", sparsify / step, ">= 2", lambda v: v >= 2)
                syncs = get(STEP, p, "host_syncs")
                if syncs is not None:
                    add(case, p, "host syncs per step", syncs, "0", lambda v: v == 0)
                mem, mem_sparsify = get(STEP, p, "peak_mem_gib"), get(STEP, "sparsify", "peak_mem_gib")
                if mem is not None and mem_sparsify:
                    add(case, p, "peak memory / sparsify's", mem / mem_sparsify, "<= 0.5", lambda v: v <= 0.5)
            dead = get(STEP_DEAD, p)
            if dead is not None and step:
                add(case, p, "step 20% dead / 0% dead", dead / step, "<= 1.2", lambda v: v <= 1.2)
            enc, enc_aux = get(ENCODER, p), get(ENCODER_AUX, p)
            if enc is not None and gemm:
                add(case, p, "encoder+topk / GEMM", enc / gemm, "<= 1.05", lambda v: v <= 1.05)
            if enc and enc_aux is not None:
                add(case, p, "encoder with AuxK / without", enc_aux / enc, "(the cost of AuxK)", lambda v: None)
            for latents in LATENTS:
                bw = get(suite_name(DECODER, latents), p, "gb_per_s")
                if bw is not None and copy_bw:
                    add(
                        case, p, f"decoder fwd+bwd % copy BW, {latents}", 100 * bw / copy_bw, ">= 80", lambda v: v >= 80
                    )
            hot, uniform = get(suite_name(ENC_BWD, "power-law"), p), get(suite_name(ENC_BWD, "uniform"), p)
            if hot is not None and uniform:
                add(case, p, "encoder backward power-law / uniform", hot / uniform, "<= 1.2", lambda v: v <= 1.2)
    return out


def targets_table(found: list[dict]) -> str:
    if not found:
        return ""
    lines = [
        "\n**ratios against the targets**\n",
        "| case | provider | ratio | value | target | met |",
        "|---|---|---|---:|---|---|",
    ]
    for t in found:
        met = "" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['case']} | {t['provider']} | {t['ratio']} | {t['value']} | {t['target']} | {met} |")
    return "\n".join(lines)


def profiles_table(profiles: dict[str, dict]) -> str:
    """The measured firing distribution of each case's realistic batch."""
    if not profiles:
        return ""
    lines = [
        "\n**firing profile of the realistic batches** (power law of firing rates, measured on the SAE's selection)\n",
        "| case | alpha | hottest rates | latents > 10% | latents > 1% | never fire | log-log slope |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for case, p in profiles.items():
        lines.append(
            f"| {case} | {p['alpha']} | {', '.join(f'{v:.3f}' for v in p['top_rates'])} | {p['latents_over_10pct']} | "
            f"{p['latents_over_1pct']} | {p['never_fired_frac']:.1%} | {p['loglog_slope']} |"
        )
    return "\n".join(lines)


def markdown(
    env: dict, rows: list[dict], profiles: dict[str, dict], title: str, notes: str = "", appendix: str = ""
) -> str:
    """The report: header (device, versions, commit), the ratios against the targets, ``notes``, the firing
    profiles, the per-suite tables, then ``appendix``."""
    header = (
        f"# {title}: {env['device']}\n\ntorch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"numpy {env['numpy']}, Python {env['python']}, {env['threads']} threads, commit `{env['commit'][:10]}`"
        f"{' (dirty tree)' if env['dirty'] else ''}, {env['date']}"
        f"{' (TRITON_INTERPRET=1)' if env.get('triton_interpret') else ''}\n"
    )
    body = [header, targets_table(targets(rows)), notes, profiles_table(profiles), table(rows), appendix]
    return "\n".join(part for part in body if part) + "\n"


def write(stem: Path, env: dict, rows: list[dict], profiles: dict[str, dict], title: str, **more) -> list[Path]:
    """Writes ``stem.json`` (everything) and ``stem.md`` (the tables); returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "targets": targets(rows), "profiles": profiles, "results": rows, **more}
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown(env, rows, profiles, title, more.get("notes", ""), more.get("appendix", "")))
    return [json_path, md_path]


def slug(env: dict) -> str:
    name = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()[:40]
    return f"{name}-{env['commit'][:10]}"
