"""Benchmark session: chooses the device and shapes, times each (case, provider) with pytest-benchmark, and at the
end writes the side-by-side table (ratios to the GEMM floor and to the unfused baseline) and, with --bench-save,
JSON + markdown under benchmarks/results/ with the device, versions and commit.

    .venv/bin/python -m pytest benchmarks                     # CPU: the foundation's step benchmark, 2 threads
    python -m pytest benchmarks --bench-save                  # on a GPU: the reference shapes, results committed
                                                              # (docs/architecture.md#targets)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import providers
import report
from providers import Case

_ROWS: list[dict] = []
_PROFILES: dict[str, dict] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedsae benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-threads", type=int, default=2, help="CPU threads (default 2, as on CI)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case (default 3 CPU, 20 GPU)")
    group.addoption("--bench-save", action="store_true", help="write benchmarks/results/<device>-<commit>.json/.md")
    group.addoption(
        "--bench-shapes",
        choices=("default", "small"),
        default="default",
        help="default: the docs/architecture.md#targets shapes on a GPU, the foundation's CPU shape on the CPU; "
        "small: one quick shape",
    )


def device(config: pytest.Config) -> str:
    chosen = config.getoption("--bench-device")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")


def cases(config: pytest.Config) -> list[Case]:
    dev = device(config)
    if config.getoption("--bench-shapes") == "small":
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        return [Case(f"{dev}-small-256x4096-k16-{str(dtype).removeprefix('torch.')}", 2048, 256, 4096, 16, dtype, dev)]
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
    """``measure(suite, case, provider, fn, flops=None, nbytes=None, profile=False)``: times ``fn`` and records a
    row; with ``profile`` also the host syncs and peak memory of one more call, and the realistic batch's firing
    profile for the results."""
    rounds = request.config.getoption("--bench-rounds")

    def run(
        suite: str,
        case: Case,
        provider: str,
        fn,
        flops: float | None = None,
        nbytes: float | None = None,
        profile: bool = False,
    ):
        n = rounds or (3 if case.device == "cpu" else 20)
        benchmark.group = f"{suite}:{case.name}"
        benchmark.pedantic(fn, rounds=n, warmup_rounds=1, iterations=1)
        stats = benchmark.stats.stats
        extra = providers.step_profile(fn, case.device) if profile else {}
        row = report.make_row(suite, case, provider, stats.median, stats.min, n, flops, nbytes, **extra)
        if profile:
            _PROFILES[case.name] = providers.realistic(case).profile
        benchmark.extra_info.update(row)
        _ROWS.append(row)

    return run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _ROWS:
        return
    env = report.environment(device(session.config))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"\nfusedsae benchmarks on {env['device']} ({env['threads']} threads), "
            f"commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}"
        )
        reporter.write_line(report.targets_table(report.targets(_ROWS)))
        reporter.write_line(report.profiles_table(_PROFILES))
        reporter.write_line(report.table(_ROWS))
    if session.config.getoption("--bench-save"):
        report.write(report.RESULTS / report.slug(env), env, _ROWS, _PROFILES, "fusedsae benchmarks")
