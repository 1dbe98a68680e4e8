"""Compiles every Triton kernel launch of the triton backend for an NVIDIA GPU, on a machine without one.

The interpreter that runs the kernels in CI is more lenient than the compiler (``tl.dot`` shapes, constexpr-only
control flow, layouts), so this script drives the real launchers with the GPU block configurations, intercepts
each kernel launch, and compiles it to a cubin for the target (default sm_90, the H100) with triton's bundled
ptxas, instead of launching it. No kernel runs; the tensors the launchers see after a launch are garbage, so an
op may raise after its launches and that is ignored here. Run it without TRITON_INTERPRET:

    python tests/compile_for_gpu.py [--arch 90] [--dtypes bfloat16,float16,float32] [--verbose]

It prints one line per compiled specialisation (registers and spills from ``ptxas -v``, shared memory) and exits
non-zero if a kernel fails to compile or some kernel of fusedsae.kernels was never launched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_for_gpu.py needs compiled kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


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


def _ptxas_report(ptx: str, arch: int) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    return f"{regs.group(1) if regs else '?'} regs, {spills.group(1) if spills else '?'} B spilled"


def _compile_everything(arch: int, verbose: bool, dtypes: list[torch.dtype]) -> int:
    import fusedsae.backends.triton as tt
    from fusedsae import backends
    from fusedsae.kernels import encoder, heads, jumprelu, sparse, topk

    kernels = {
        name: getattr(module, name)
        for module in (encoder, heads, jumprelu, sparse, topk)
        for name in dir(module)
        if name.endswith("_kernel") and isinstance(getattr(module, name), JITFunction)
    }
    compiled: dict[str, list[str]] = {name: [] for name in kernels}
    failures: list[str] = []
    original_run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            raise
        constants = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
        ptx = kernel.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
        line = f"{_ptxas_report(ptx, arch)}, {kernel.metadata.shared} B shared, {mma}  {constants}"
        if line not in compiled[name]:
            compiled[name].append(line)
        return kernel

    driver.set_active(_OfflineDriver(arch))
    JITFunction.run = compile_instead
    tt._gpu = lambda t: True
    tt._sm_count = lambda t: 132
    torch.manual_seed(0)

    def attempt(fn, *args):
        with contextlib.suppress(Exception), backends.use("triton"):
            fn(*args)

    n, d_in, d_sae = 96, 64, 512
    for dtype in dtypes:
        x = torch.randn(n, d_in).to(dtype)
        W_enc = torch.randn(d_in, d_sae).to(dtype)
        b_enc, b_dec = torch.randn(d_sae).to(dtype), torch.randn(d_in).to(dtype)
        W_dec = torch.randn(d_sae, d_in).to(dtype)
        mask = torch.rand(d_sae) < 0.5
        for activation in ("none", "relu", "jumprelu"):
            attempt(tt.encode_dense_fwd, x, W_enc, b_enc, b_dec, b_enc, activation)
        attempt(tt.encode_dense_fwd, x, W_enc, b_enc, None, None, "relu")
        for k, aux_k in ((32, 0), (32, 16), (64, 0), (128, 128), (1, 0)):
            attempt(tt._fused_topk_keys, x, W_enc, b_enc, b_dec, k, aux_k, mask)
        attempt(tt._two_pass_topk_keys, x, W_enc, b_enc, b_dec, 200, 150, mask)
        values = torch.randn(n, 32).to(dtype)
        indices = torch.randint(0, d_sae, (n, 32))
        for index_dtype in (torch.int64, torch.int32):
            attempt(tt.sparse_decode_fwd, values, indices.to(index_dtype), W_dec, b_dec)
            attempt(tt.sparse_decode_backward_fwd, x, values, indices.to(index_dtype), W_dec)
            attempt(tt.sparse_encode_backward_fwd, values, indices.to(index_dtype), x, W_enc, b_dec, True)
            attempt(tt.head_partial_sums_fwd, x, W_enc, b_dec, indices.to(index_dtype), 4)
        tt.set_deterministic(False)
        attempt(tt.sparse_decode_backward_fwd, x, values, indices, W_dec)
        attempt(tt.sparse_encode_backward_fwd, values, indices, x, W_enc, b_dec, False)
        tt.set_deterministic(None)
        scores = torch.randn(n, d_sae).to(dtype)
        for k in (8, 64, 300):
            attempt(tt.row_topk_fwd, scores, k)
        attempt(tt._launch_row_keys, scores, mask)
        for fn in (tt.jumprelu_fwd, tt.step_fwd):
            attempt(fn, scores, b_enc)
        attempt(tt.jumprelu_backward_fwd, scores, scores, b_enc, 0.5)
        attempt(tt.step_backward_fwd, scores, scores, b_enc, 0.5)

    for name, lines in sorted(compiled.items()):
        print(f"{name}: {len(lines)} specialisation(s)")
        if verbose:
            for line in lines:
                print(f"    {line}")
    missing = sorted(name for name, lines in compiled.items() if not lines)
    for failure in failures:
        print(f"FAILED {failure}")
    if missing:
        print(f"NEVER LAUNCHED {missing}")
    return 1 if failures or missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--verbose", action="store_true", help="one line per specialisation with regs/spills")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32", help="comma-separated torch dtypes")
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    return _compile_everything(args.arch, args.verbose, dtypes)


if __name__ == "__main__":
    sys.exit(main())
