"""Compiles every Triton kernel launch of the triton backend for an NVIDIA GPU, on a machine without one, at the
real launch arguments of the DESIGN shapes, and writes a report.

The interpreter that runs the kernels in CI is more lenient than the compiler (``tl.dot`` shapes, constexpr-only
control flow, layouts), and triton specialises a kernel on its integer arguments (a loop whose trip count is 1 is
removed), so a compile at toy sizes says little about what runs. This script drives the real launchers with the GPU
block configurations on the shapes of DESIGN §9 (16384 rows; 768 -> 32768 at k = 32 and 4096 -> 131072 at k = 64;
bfloat16 and float32; without AuxK and with it at the Trainer's default ``aux_k = d_in / 2`` over 20% dead latents),
intercepts each kernel launch, and compiles it to a cubin for the target (default sm_90, the H100) with triton's
bundled ptxas instead of launching it. No kernel runs: the big tensors are allocated but never touched (or are
broadcast views), results are garbage, and ``torch.topk`` (the only expensive host-side step of the launchers) is
replaced by a stand-in while the script runs. Run it without TRITON_INTERPRET:

    python tests/compile_for_gpu.py [--arch 90] [--dtypes bfloat16,float32] [--shapes 768,4096] [--verbose]
                                    [--report benchmarks/results/compile_report --label after]

For each compiled specialisation it reports registers and spills (``ptxas -v``), shared memory, whether the MMAs
are Hopper's wgmma, and the resident blocks per SM these allow (with what limits them). With ``--report`` it
merges the run under ``--label`` into ``<report>.json`` (other labels kept, so a "before" run stays next to the
"after" one) and rewrites ``<report>.md``. It exits non-zero if a kernel fails to compile or some kernel of
fusedsae.kernels was never launched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_for_gpu.py needs compiled kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# DESIGN §9 shapes: d_in -> (d_sae, k)
SHAPES = {768: (32768, 32), 4096: (131072, 64)}
N_ROWS = 16384
DEAD_FRACTION = 0.2

# sm_90 per-SM resources (CUDA occupancy calculator): 64K registers allocated per warp in units of 256, 228 KB of
# shared memory with 1 KB reserved per block, at most 64 warps and 32 blocks.
_SM_REGISTERS = 65536
_SM_SHARED = 233472
_SM_WARPS = 64
_SM_BLOCKS = 32


class _OfflineDriver:
    """Stands in for the CUDA driver: a fixed target, device 0, no stream. Only compilation uses it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _ptxas(kernel: Any, arch: int) -> tuple[int, int]:
    """``(registers, spill-store bytes)`` of a compiled kernel, from ``ptxas -v`` run by triton's own backend on the
    kernel's PTX: the ptxas binary, flags and options of this triton (3.9 moved sm_90 to its newer ptxas and adds
    register-allocation flags), whether or not the kernel came from triton's cache."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    fields = {field.name for field in dataclasses.fields(backend.parse_options({}))}
    options = backend.parse_options({k: v for k, v in kernel.metadata._asdict().items() if k in fields})
    log = io.StringIO()
    dump = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(kernel.asm["ptx"], {}, options, arch)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    if regs is None or spills is None:
        raise RuntimeError(f"no register count in the ptxas log: {log.getvalue().strip()[-500:]}")
    return int(regs.group(1)), int(spills.group(1))


def occupancy(regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and the resource that limits them."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    limits = {
        "registers": _SM_REGISTERS // (regs_per_warp * num_warps),
        "shared memory": _SM_SHARED // (shared + 1024),
        "warps": _SM_WARPS // num_warps,
        "blocks": _SM_BLOCKS,
    }
    limiter = min(limits, key=lambda name: limits[name])
    return limits[limiter], limiter


class _Recorder:
    """Intercepts ``JITFunction.run``: compiles the launch, records one row per (kernel, specialisation, case)."""

    def __init__(self, arch: int, kernels: dict[str, JITFunction]) -> None:
        self.arch = arch
        self.kernels = kernels
        self.case = ""
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._seen: dict[tuple[str, str], dict[str, Any]] = {}

    def run(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def compile_instead(jit: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            name = jit.fn.__name__
            try:
                kernel = original(jit, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:
                self.failures.append(f"{self.case}: {name}: {type(exc).__name__}: {exc}")
                raise
            constants = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages", "maxnreg")}
            constants = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in constants.items()}
            key = (name, kernel.hash)
            row = self._seen.get(key)
            if row is None:
                ptx = kernel.asm["ptx"]
                try:
                    regs, spills = _ptxas(kernel, self.arch)
                except Exception as exc:
                    self.failures.append(f"{self.case}: {name}: ptxas: {type(exc).__name__}: {exc}")
                    raise
                warps = kernel.metadata.num_warps
                blocks, limiter = occupancy(regs, kernel.metadata.shared, warps)
                row = {
                    "kernel": name,
                    "constants": constants,
                    "registers": regs,
                    "spill_bytes": spills,
                    "shared_bytes": kernel.metadata.shared,
                    "num_warps": warps,
                    "mma": "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none",
                    "tma": "cp.async.bulk.tensor" in ptx,
                    "blocks_per_sm": blocks,
                    "limited_by": limiter,
                    "cases": [],
                }
                self._seen[key] = row
                self.rows.append(row)
            if self.case not in row["cases"]:
                row["cases"].append(self.case)
            return kernel

        return compile_instead


def _stand_in_topk(input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, **_: Any):
    """``torch.topk`` without the work: the launchers only need the result's shape (the data is garbage)."""
    shape = list(input.shape)
    shape[dim] = k
    values = torch.zeros(shape, dtype=input.dtype)
    return torch.return_types.topk((values, torch.zeros(shape, dtype=torch.int64)))


def _wide(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``[rows, cols]`` input that costs one row of memory (row stride 0: divisible by 16 like the real stride,
    so triton compiles the same specialisation)."""
    return torch.empty(1, cols, dtype=dtype).expand(rows, cols)


def _launch_all(
    run: Callable[..., None], dtypes: list[torch.dtype], shapes: list[int], configs: list[str] | None, only_encoder
) -> None:
    """Every launch the training and analysis paths make at the real shapes, each as ``run(case, fn, *args)``;
    with ``configs`` the fused encoder's launches once per named candidate configuration."""
    import fusedsae.backends.triton as tt

    def encoders(tag: str, *args: Any) -> None:
        x, W_enc, b_enc, b_dec, k, aux_k, dead = args
        for name in configs or [None]:
            tt.set_encoder_config(name)
            suffix = f" [{name}]" if name else ""
            try:
                run(f"{tag} topk{suffix}", tt.encoder.topk_encode, x, W_enc, b_enc, b_dec, k, 0, None)
                run(f"{tag} topk+auxk={aux_k}{suffix}", tt.encoder.topk_encode, x, W_enc, b_enc, b_dec, k, aux_k, dead)
                run(f"{tag} topk+auxk=128{suffix}", tt.encoder.topk_encode, x, W_enc, b_enc, b_dec, k, 128, dead)
            finally:
                tt.set_encoder_config(None)

    def atomics(*args: Any) -> None:
        tt.set_deterministic(False)
        try:
            tt.sparse.sparse_decode_backward(*args[:4])
            tt.sparse.sparse_encode_backward(args[1], args[2], args[0], *args[4:], False)
        finally:
            tt.set_deterministic(None)

    for d_in in shapes:
        d_sae, k = SHAPES[d_in]
        for dtype in dtypes:
            tag = f"{d_in}->{d_sae} k={k} {str(dtype).removeprefix('torch.')}"
            x = torch.empty(N_ROWS, d_in, dtype=dtype)
            W_enc = torch.empty(d_in, d_sae, dtype=dtype)
            W_dec = torch.empty(d_sae, d_in, dtype=dtype)
            b_enc, b_dec = torch.zeros(d_sae, dtype=dtype), torch.zeros(d_in, dtype=dtype)
            dead = torch.rand(d_sae) < DEAD_FRACTION
            aux_k = d_in // 2
            encoders(tag, x, W_enc, b_enc, b_dec, k, aux_k, dead)
            if only_encoder:
                continue
            run(f"{tag} batchtopk", tt.encoder.batchtopk_encode, x, W_enc, b_enc, b_dec, k, 0, None)
            indices = torch.randint(0, d_sae, (N_ROWS, k))
            for m, what in ((k, ""), (k + aux_k, "+auxk")):
                values = torch.empty(N_ROWS, m, dtype=dtype)
                wide = torch.randint(0, d_sae, (N_ROWS, m))
                run(f"{tag} backward{what}", tt.sparse.sparse_decode, values, wide, W_dec, b_dec)
                run(f"{tag} backward{what}", tt.sparse.sparse_decode_backward, x, values, wide, W_dec)
                run(f"{tag} backward{what}", tt.sparse.sparse_encode_backward, values, wide, x, W_enc, b_dec, True)
            run(f"{tag} backward (atomics)", atomics, x, values[:, :k], indices, W_dec, W_enc, b_dec)
            scores = _wide(N_ROWS, d_sae, dtype)
            run(f"{tag} row_topk", tt.topk.row_topk, scores, k)
            run(f"{tag} row_topk k=256", tt.topk.row_topk, scores, 256)
            for activation in ("relu", "jumprelu"):
                run(
                    f"{tag} encode_dense {activation}",
                    tt.encoder.encode_dense,
                    x,
                    W_enc,
                    b_enc,
                    b_dec,
                    b_enc,
                    activation,
                )
            run(f"{tag} jumprelu", tt.jumprelu.jumprelu, scores, b_enc)
            run(f"{tag} jumprelu", tt.jumprelu.step, scores, b_enc)
            run(f"{tag} jumprelu", tt.jumprelu.jumprelu_backward, scores, scores, b_enc, 0.5)
            run(f"{tag} jumprelu", tt.jumprelu.step_backward, scores, scores, b_enc, 0.5)
            run(f"{tag} head_partial_sums", tt.heads.head_partial_sums, x, W_enc, b_dec, indices, d_in // 64)
            _launch_matryoshka(run, tag, x, W_dec, b_dec, indices)
            features = torch.randperm(d_sae)[:256]
            run(
                f"{tag} head partials, 256 features",
                tt.heads.encode_head_partials,
                x,
                W_enc,
                b_enc,
                b_dec,
                features,
                d_in // 64,
            )


def _launch_matryoshka(run: Callable[..., None], tag: str, x, W_dec, b_dec, indices) -> None:
    """The Matryoshka decoder + loss and its backward with five nested widths (d_sae / 256 ... d_sae, as
    benchmarks/matryoshka_step.py), on the TopK code; the backward with the loss-only gradient the SAE gives."""
    import fusedsae.backends.triton as tt

    d_sae = W_dec.shape[0]
    widths = [d_sae >> (2 * (4 - level)) for level in range(5)]
    values = torch.empty(indices.shape, dtype=x.dtype)
    grad_sq = torch.empty(indices.shape[0], len(widths), dtype=x.dtype)
    run(f"{tag} matryoshka", tt.matryoshka.matryoshka_decode_loss, values, indices, W_dec, b_dec, x, widths)
    backward = tt.matryoshka.matryoshka_decode_loss_backward
    run(f"{tag} matryoshka", backward, None, grad_sq, values, indices, W_dec, x, x, widths)


def compile_all(
    arch: int, dtypes: list[torch.dtype], shapes: list[int], configs: list[str] | None = None, only_encoder=False
) -> _Recorder:
    """Compiles every case; returns the recorder with its rows and failures."""
    import fusedsae.backends.triton as tt
    from fusedsae import backends
    from fusedsae.kernels import encoder, heads, jumprelu, matryoshka, sparse, topk

    kernels = {
        name: getattr(module, name)
        for module in (encoder, heads, jumprelu, matryoshka, sparse, topk)
        for name in dir(module)
        if name.endswith("_kernel") and isinstance(getattr(module, name), JITFunction)
    }
    recorder = _Recorder(arch, kernels)
    original_run = JITFunction.run
    driver.set_active(_OfflineDriver(arch))
    JITFunction.run = recorder.run(original_run)
    tt.assume_gpu(132)
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(backends.use("triton"))
        real_topk = torch.topk
        torch.topk = _stand_in_topk
        stack.callback(setattr, torch, "topk", real_topk)

        def run(label: str, fn: Callable[..., Any], *args: Any) -> None:
            recorder.case = label
            print(f"compiling: {label} ({fn.__name__})", flush=True)
            # the launchers go on with garbage after a launch and may raise on it: only the compiles matter
            with contextlib.suppress(Exception):
                fn(*args)

        _launch_all(run, dtypes, shapes, configs, only_encoder)
    JITFunction.run = original_run
    return recorder


def _row_line(row: dict[str, Any]) -> str:
    flags = ", ".join(f"{k}={v}" for k, v in row["constants"].items() if k not in ("num_warps", "num_stages"))
    return (
        f"| `{row['kernel']}` | {flags} | {row['num_warps']} | {row['registers']} | {row['spill_bytes']} | "
        f"{row['shared_bytes'] // 1024} | {row['mma']}{' + TMA' if row['tma'] else ''} | {row['blocks_per_sm']} "
        f"({row['limited_by']}) | {'; '.join(row['cases'][:3])}{' …' if len(row['cases']) > 3 else ''} |"
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """Every label's rows, the hot-path kernels first."""
    lines = [
        "# Offline sm_90 compile at the DESIGN shapes",
        "",
        "Written by `tests/compile_for_gpu.py --report benchmarks/results/compile_report` (no GPU: triton's bundled",
        "ptxas on the real launch arguments). Blocks/SM is the sm_90 occupancy these registers, shared memory and",
        "warps allow; the hot path is the fused encoder (`_topk_encode_fwd_kernel`), which wants at least two",
        "resident blocks so that one block's epilogue overlaps another's MMAs.",
        "",
    ]
    for label, run in report["runs"].items():
        lines += [
            f"## {label}",
            "",
            f"{run['note']}" if run.get("note") else "",
            f"triton {run['triton']}, sm_{run['arch']}, commit {run['commit']}.",
            "",
            "| kernel | specialisation | warps | registers | spilled B | shared KB | MMA | blocks/SM | cases |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        hot = sorted(run["rows"], key=lambda r: (not r["kernel"].startswith("_topk_encode"), r["kernel"]))
        lines += [_row_line(row) for row in hot]
        lines.append("")
    path.write_text("\n".join(lines))


def _commit() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--verbose", action="store_true", help="one line per specialisation")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    parser.add_argument("--shapes", default="768,4096", help=f"comma-separated d_in among {sorted(SHAPES)}")
    parser.add_argument(
        "--configs", default="", help="'all' or comma-separated CANDIDATE_CONFIGS names: compile the encoder with each"
    )
    parser.add_argument("--only-encoder", action="store_true", help="compile only the fused encoder cases")
    parser.add_argument("--report", type=Path, help="write <report>.json and <report>.md (merging other labels)")
    parser.add_argument("--label", default="current", help="name of this run in the report")
    parser.add_argument("--note", default="", help="one line describing this run in the report")
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = [int(s) for s in args.shapes.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: {unknown} not among {sorted(SHAPES)}")
    configs = None
    if args.configs:
        import fusedsae.backends.triton as tt

        configs = list(tt.CANDIDATE_CONFIGS) if args.configs == "all" else args.configs.split(",")
    recorder = compile_all(args.arch, dtypes, shapes, configs, args.only_encoder)
    by_kernel: dict[str, list[dict[str, Any]]] = {name: [] for name in recorder.kernels}
    for row in recorder.rows:
        by_kernel.setdefault(row["kernel"], []).append(row)
    for name, rows in sorted(by_kernel.items()):
        print(f"{name}: {len(rows)} specialisation(s)")
        if args.verbose:
            for row in rows:
                print("    " + _row_line(row))
    if args.report:
        path = args.report.with_suffix(".json")
        report = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        report["runs"][args.label] = {
            "note": args.note,
            "triton": triton.__version__,
            "arch": args.arch,
            "commit": _commit(),
            "rows": recorder.rows,
        }
        path.write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, args.report.with_suffix(".md"))
    missing = [] if args.only_encoder else sorted(name for name, rows in by_kernel.items() if not rows)
    for failure in recorder.failures:
        print(f"FAILED {failure}")
    if missing:
        print(f"NEVER LAUNCHED {missing}")
    return 1 if recorder.failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
