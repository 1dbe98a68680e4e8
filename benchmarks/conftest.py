"""Benchmark session: chooses the device and shapes, times each (case, provider) with pytest-benchmark, and at the
end writes the side-by-side table (ratios to the GEMM floor and to the unfused baseline) and, with --bench-save,
JSON + markdown under benchmarks/results/ with the device, versions and commit.

    .venv/bin/python -m pytest benchmarks                     # CPU: the foundation's step benchmark, 2 threads
    python -m pytest benchmarks --bench-save                  # on a GPU: the reference shapes, results committed
                                                              # (docs/architecture.md#targets)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from providers import Case

RESULTS = Path(__file__).resolve().parent / "results"
_ROWS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedsae benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-threads", type=int, default=2, help="CPU threads (default 2, as on CI)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case (default 3 CPU, 20 GPU)")
    group.addoption("--bench-save", action="store_true", help="write benchmarks/results/<device>-<commit>.json/.md")


def device(config: pytest.Config) -> str:
    chosen = config.getoption("--bench-device")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")


def cases(config: pytest.Config) -> list[Case]:
    dev = device(config)
    if dev == "cpu":
        # The foundation issue's CPU comparison: d_in=768, d_sae=16384, k=32, batch 4096, float32.
        return [Case("cpu-768x16384-k32-fp32", 4096, 768, 16384, 32, torch.float32, "cpu")]
    out = []
    for d_in, d_sae, k in ((768, 32768, 32), (4096, 131072, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{d_in}x{d_sae}-k{k}-{str(dtype).removeprefix('torch.')}"
            out.append(Case(name, 16384, d_in, d_sae, k, dtype, dev))
    return out


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(config.getoption("--bench-threads"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        found = cases(metafunc.config)
        metafunc.parametrize("case", found, ids=[c.name for c in found])


@pytest.fixture
def measure(request: pytest.FixtureRequest, benchmark):
    """``measure(suite, case, provider, fn, flops=None, nbytes=None)``: times ``fn`` and records a row."""
    rounds = request.config.getoption("--bench-rounds")

    def run(suite: str, case: Case, provider: str, fn, flops: float | None = None, nbytes: float | None = None):
        n = rounds or (3 if case.device == "cpu" else 20)
        benchmark.group = f"{suite}:{case.name}"
        benchmark.pedantic(fn, rounds=n, warmup_rounds=1, iterations=1)
        seconds = benchmark.stats.stats.median
        row = {
            "suite": suite,
            "case": case.name,
            "provider": provider,
            "median_s": seconds,
            "min_s": benchmark.stats.stats.min,
            "rounds": n,
            **case.describe(),
        }
        row["tokens_per_s"] = case.n / seconds
        if flops:
            row["tflops"] = flops / seconds / 1e12
        if nbytes:
            row["gb_per_s"] = nbytes / seconds / 1e9
        benchmark.extra_info.update(row)
        _ROWS.append(row)

    return run


def _environment(dev: str) -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=RESULTS.parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else (platform.processor() or "cpu"),
        # settings that change what the kernels compute: TF32 products, and sorted vs atomic gradient sums
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "deterministic": os.environ.get("FUSEDSAE_DETERMINISTIC", "1") != "0",
        "device_kind": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": run("git", "rev-parse", "HEAD"),
        "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def table(rows: list[dict]) -> str:
    """Markdown: per (suite, case), each provider's median time, its distance from the floor measured in the same
    run (compute-bound suites: time over the GEMM's; memory-bound ones: bandwidth as a share of the copy's) and the
    speed-up over torch-unfused."""
    lines = []
    floors = {r["case"]: r["median_s"] for r in rows if r["provider"] == "gemm"}
    copies = {r["case"]: r["gb_per_s"] for r in rows if r["provider"] == "copy"}
    for suite in dict.fromkeys(r["suite"] for r in rows):
        if suite == "floor":
            continue
        for case in dict.fromkeys(r["case"] for r in rows if r["suite"] == suite):
            group = [r for r in rows if r["suite"] == suite and r["case"] == case]
            unfused = next((r["median_s"] for r in group if r["provider"] == "torch-unfused"), None)
            lines += [
                f"\n**{suite}**, {case}\n",
                "| provider | median ms | tokens/s | x GEMM | % copy BW | speed-up vs torch-unfused | TFLOP/s | GB/s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            memory_bound = all("gb_per_s" in r for r in group)
            for r in sorted(group, key=lambda r: r["median_s"]):
                floor, copy = floors.get(case), copies.get(case)
                cells = [
                    r["provider"],
                    f"{r['median_s'] * 1e3:.2f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['median_s'] / floor:.2f}" if floor and not memory_bound else "",
                    f"{100 * r['gb_per_s'] / copy:.0f}%" if copy and memory_bound else "",
                    f"{unfused / r['median_s']:.2f}" if unfused else "",
                    f"{r['tflops']:.1f}" if "tflops" in r else "",
                    f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    floor_rows = [r for r in rows if r["suite"] == "floor"]
    if floor_rows:
        lines += ["\n**floors**\n", "| measure | case | median ms | TFLOP/s | GB/s |", "|---|---|---:|---:|---:|"]
        for r in floor_rows:
            lines.append(
                f"| {r['provider']} | {r['case']} | {r['median_s'] * 1e3:.2f} | "
                f"{r.get('tflops', 0):.1f} | {r.get('gb_per_s', 0):.0f} |"
            )
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _ROWS:
        return
    dev = device(session.config)
    env = _environment(dev)
    text = table(_ROWS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"\nfusedsae benchmarks on {env['device']} ({env['threads']} threads), "
            f"commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}"
        )
        reporter.write_line(text)
    if session.config.getoption("--bench-save"):
        RESULTS.mkdir(exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()[:40]
        stem = RESULTS / f"{slug}-{env['commit'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": _ROWS}, indent=2) + "\n")
        header = (
            f"# fusedsae benchmarks: {env['device']}\n\ntorch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}, {env['threads']} threads, commit `{env['commit'][:10]}`"
            f"{' (dirty tree)' if env['dirty'] else ''}, {env['date']}\n"
        )
        stem.with_suffix(".md").write_text(header + text + "\n")
