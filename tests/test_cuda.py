"""The cuda backend (csrc/ through the pybind11 extension fusedsae._C).

* Build and import, on every machine: where nvcc is available (CI has nvcc 13.0 and no GPU) the extension must
  have been compiled and must import, expose its launchers, and report the missing GPU cleanly; an explicit request
  for the cuda backend then fails with that reason. setup.py's skip/force switches are run too.
* The launcher layer (fusedsae/backends/cuda.py) on the CPU: an emulation of the launcher contract of
  csrc/fusedsae.h, working on host memory through the same data pointers, stands in for the kernels, so the
  pointers, strides, sizes, the per-latent sort and the final TopK ordering the backend passes are checked against
  the reference without a GPU. Its signatures are checked against the compiled bindings.
* The kernels themselves (GPU only, skipped without CUDA): every op against the reference, forward and gradients,
  odd shapes, k = 1, k = d_sae, ties, all-negative rows, fp32/bf16/fp16 (STYLE §10), int32/int64 indices, rows of
  a million latents, and bitwise-repeatable results.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import naive
from conftest import assert_close_lowp, opcheck_cases
from fusedsae import backends, reference
from fusedsae import functional as F
from fusedsae.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("gather_rows", "gather_dot", "segment_sum_rows", "segment_sum_columns", "row_topk_select")
LAUNCHERS += ("head_partial_sums", "matryoshka_decode_loss", "matryoshka_decode_loss_backward")
CUDA_OPS = {"sparse_decode", "sparse_decode_backward", "sparse_encode_backward", "row_topk", "topk_encode"}
CUDA_OPS |= {"head_partial_sums"}
CUDA_OPS |= {"matryoshka_decode_loss", "matryoshka_decode_loss_backward"}
LOWP = (torch.bfloat16, torch.float16)


def _nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _extension_expected() -> str | None:
    """Why the extension need not exist here (no nvcc, or the install skipped it on purpose), or None: then a
    missing extension is a failure, not a skip."""
    record = cuda_backend.build_record()
    if record is not None and not record["built"] and record["reason"] == "FUSEDSAE_CUDA=0":
        return "installed with FUSEDSAE_CUDA=0"
    if _nvcc() is None:
        return "no nvcc here, so setup.py skips the extension"
    return None


def _C():
    why_not = _extension_expected()
    module, reason = cuda_backend.extension()
    if module is None:
        if why_not is not None:
            pytest.skip(f"fusedsae._C is not built ({reason}): {why_not}")
        pytest.fail(f"nvcc is at {_nvcc()} but fusedsae._C cannot be used: {reason}")
    return module


# ---------------------------------------------------------------------------------------------------------------
# build, import and report (any machine)
# ---------------------------------------------------------------------------------------------------------------


def test_extension_is_compiled_and_exposes_its_launchers():
    module = _C()
    for name in (*LAUNCHERS, "runtime_info", "kernel_image_error"):
        assert callable(getattr(module, name)), name
    assert [a for a in module.ARCHS.split(";") if a], module.ARCHS
    assert all(re.fullmatch(r"\d{2,3}[af]?", a) for a in module.ARCHS.split(";"))
    assert module.CUDA_VERSION >= 11000
    info = module.runtime_info()
    assert set(info) == {"runtime_version", "driver_version", "device_count", "error"}
    assert info["runtime_version"] == module.CUDA_VERSION
    record = cuda_backend.build_record()
    assert record is not None and record["built"], record
    assert record["archs"] == module.ARCHS.split(";")


def test_the_extension_links_no_cuda_shared_library():
    """Static CUDA runtime and no driver at link time: the extension imports where neither exists (CI)."""
    module = _C()
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd to list the extension's shared libraries")
    libraries = subprocess.run([ldd, module.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in libraries and "libcuda." not in libraries, libraries


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how the backend reports a machine without a GPU")
def test_report_says_no_gpu_and_explicit_requests_fail_with_that_reason():
    module = _C()
    entry = backends.report()["cuda"]
    assert entry["available"] is False
    archs = ", ".join(f"sm_{a}" for a in module.ARCHS.split(";"))
    assert entry["reason"].startswith(f"compiled for {archs} with CUDA "), entry["reason"]
    assert "no GPU" in entry["reason"] or "no CUDA support" in entry["reason"], entry["reason"]
    assert set(entry["ops"]) == CUDA_OPS
    values, indices, W_dec = torch.randn(3, 2), torch.randint(0, 5, (3, 2)), torch.randn(5, 4)
    pattern = r"FUSEDSAE_BACKEND=cuda cannot run sparse_decode: compiled for .*(no GPU|no CUDA support)"
    with backends.use("cuda"), pytest.raises(backends.BackendError, match=pattern):
        F.sparse_decode(values, indices, W_dec)
    with backends.use("cuda"), pytest.raises(backends.BackendError, match="cannot run row_topk: compiled for"):
        F.row_topk(torch.randn(2, 9), 3)
    # auto never picks it here: the reference runs
    expected = reference.sparse_decode(values, indices, W_dec, None)
    torch.testing.assert_close(F.sparse_decode(values, indices, W_dec), expected)


def test_launchers_raise_python_errors_naming_the_cuda_error():
    module = _C()
    if module.runtime_info()["driver_version"] != 0:
        pytest.skip("needs a machine without an NVIDIA driver: a launch on bogus pointers must not reach a GPU")
    fake = 1 << 20  # never dereferenced: the launch fails in the runtime before any kernel runs
    args = dict(values=fake, indices=fake, scores=fake, scores_stride=8, n_rows=2, width=8, k=3, stream=0)
    with pytest.raises(RuntimeError, match=r"fusedsae\._C\.row_topk_select failed: cudaError\w+: \w"):
        module.row_topk_select(dtype=0, **args)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        module.row_topk_select(dtype=7, **args)
    with pytest.raises(RuntimeError, match="row_topk_select failed: cudaErrorInvalidValue"):
        module.row_topk_select(dtype=0, **{**args, "k": 9})  # k > width is refused before any launch
    with pytest.raises(TypeError):
        module.row_topk_select(dtype=0, **{**args, "kk": 3})


def _run_setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``setup.py build_ext`` into tmp_path with the given environment (no compilation when it skips)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FUSEDSAE_CUDA")}
    full_env.update(env)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib")]
    cmd += ["--build-temp", str(tmp_path / "temp")]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def _path_without_nvcc() -> str:
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"FUSEDSAE_CUDA": "0"}, "FUSEDSAE_CUDA=0"), ({"FUSEDSAE_CUDA": "auto", "PATH": None}, "nvcc not found")],
)
def test_setup_records_why_it_skips_the_extension(tmp_path, env, reason):
    env = {k: (_path_without_nvcc() if v is None else v) for k, v in env.items()}
    result = _run_setup(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "lib" / "fusedsae" / "_cuda_build.json").read_text())
    assert record["built"] is False and record["reason"].startswith(reason), record
    assert not list((tmp_path / "lib" / "fusedsae").glob("_C.*"))
    assert f"not building the CUDA extension fusedsae._C: {reason}" in result.stderr


def test_setup_fails_loudly_when_the_extension_is_demanded_but_cannot_be_built(tmp_path):
    result = _run_setup(tmp_path, FUSEDSAE_CUDA="1", PATH=_path_without_nvcc())
    assert result.returncode != 0
    assert "FUSEDSAE_CUDA=1 but nvcc not found" in result.stderr
    bad = _run_setup(tmp_path, FUSEDSAE_CUDA="maybe")
    assert bad.returncode != 0 and "FUSEDSAE_CUDA='maybe': use auto" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# the launcher layer on the CPU, against an emulation of csrc/fusedsae.h
# ---------------------------------------------------------------------------------------------------------------

_FLOATS = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_INDEX = {0: torch.int32, 1: torch.int64}


def _at(address: int, dtype: torch.dtype, shape: tuple[int, int], strides: tuple[int, int]) -> torch.Tensor:
    """The ``shape`` matrix of ``dtype`` at host ``address`` with ``strides`` (elements), sharing the memory."""
    if shape[0] == 0 or shape[1] == 0:
        return torch.empty(shape, dtype=dtype)
    count = (shape[0] - 1) * strides[0] + (shape[1] - 1) * strides[1] + 1
    size = torch.empty(0, dtype=dtype).element_size()
    buffer = (ctypes.c_char * (count * size)).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype, count=count).as_strided(shape, strides)


class EmulatedLaunchers:
    """csrc/fusedsae.h's launcher contract in plain torch, on host memory (float32 sums, like the kernels)."""

    ARCHS = "80;90"
    SEGMENT_CHUNK = 64

    def gather_rows(self, dtype, index_dtype, out, out_stride, values, values_stride, indices, indices_stride,
                    table, table_stride_latent, table_stride_feature, bias, n_rows, m, d, stream):  # fmt: skip
        T = _FLOATS[dtype]
        v = _at(values, T, (n_rows, m), (values_stride, 1)).float()
        idx = _at(indices, _INDEX[index_dtype], (n_rows, m), (indices_stride, 1)).long()
        rows = int(idx.max()) + 1 if idx.numel() else 0
        W = _at(table, T, (rows, d), (table_stride_latent, table_stride_feature)).float()
        acc = torch.zeros(n_rows, d)
        for j in range(m):
            acc += torch.where(v[:, j : j + 1] == 0, 0.0, v[:, j : j + 1] * W[idx[:, j]])
        if bias:
            acc += _at(bias, T, (1, d), (d, 1)).float()
        _at(out, T, (n_rows, d), (out_stride, 1)).copy_(acc)

    def gather_dot(self, dtype, index_dtype, out, out_stride, vectors, vectors_stride, indices, indices_stride,
                   table, table_stride_latent, table_stride_feature, n_rows, m, d, stream):  # fmt: skip
        T = _FLOATS[dtype]
        g = _at(vectors, T, (n_rows, d), (vectors_stride, 1)).float()
        idx = _at(indices, _INDEX[index_dtype], (n_rows, m), (indices_stride, 1)).long()
        rows = int(idx.max()) + 1 if idx.numel() else 0
        W = _at(table, T, (rows, d), (table_stride_latent, table_stride_feature)).float()
        _at(out, T, (n_rows, m), (out_stride, 1)).copy_((W[idx] * g[:, None, :]).sum(-1))

    def _segments(self, order, keys, offsets, n_entries, weights, weights_stride, m, src, src_stride, sub, n_latents,
                  d, T):  # fmt: skip
        offs = _at(offsets, torch.int64, (1, n_latents + 1), (n_latents + 1, 1))[0]
        total = int(offs[-1])
        assert total == n_entries, "every entry lies in a segment"
        ordr = _at(order, torch.int64, (1, total), (total, 1))[0] if total else torch.empty(0, dtype=torch.int64)
        if total:  # keys name each entry's latent, consistently with the offsets
            latents = _at(keys, torch.int32, (1, total), (total, 1))[0].long()
            assert torch.equal(latents, torch.repeat_interleave(torch.arange(n_latents), offs.diff()))
        tokens = int(ordr.div(m, rounding_mode="floor").max()) + 1 if total else 0
        w = _at(weights, T, (tokens, m), (weights_stride, 1)).float()
        x = _at(src, T, (tokens, d), (src_stride, 1)).float()
        if sub:
            x = x - _at(sub, T, (1, d), (d, 1)).float()
        sums, weight_sums = torch.zeros(n_latents, d), torch.zeros(n_latents)
        for i in range(n_latents):
            for p in ordr[int(offs[i]) : int(offs[i + 1])].tolist():
                if w[p // m, p % m] != 0:  # the kernels skip zero weights' rows
                    sums[i] += w[p // m, p % m] * x[p // m]
                weight_sums[i] += w[p // m, p % m]
        return sums, weight_sums

    def segment_sum_rows(self, dtype, out, order, keys, offsets, n_entries, part, weights, weights_stride, m, src,
                         src_stride, n_latents, d, stream):  # fmt: skip
        T = _FLOATS[dtype]
        assert part, "the chunked sums need their scratch"
        sums, _ = self._segments(
            order, keys, offsets, n_entries, weights, weights_stride, m, src, src_stride, 0, n_latents, d, T
        )
        _at(out, T, (n_latents, d), (d, 1)).copy_(sums)

    def segment_sum_columns(self, dtype, out, out_sum, order, keys, offsets, n_entries, part, part_sum, weights,
                            weights_stride, m, src, src_stride, sub, n_latents, d, stream):  # fmt: skip
        T = _FLOATS[dtype]
        assert part and part_sum, "the chunked sums need their scratch"
        sums, weight_sums = self._segments(
            order, keys, offsets, n_entries, weights, weights_stride, m, src, src_stride, sub, n_latents, d, T
        )
        _at(out, T, (d, n_latents), (n_latents, 1)).copy_(sums.t())
        _at(out_sum, T, (1, n_latents), (n_latents, 1)).copy_(weight_sums[None])

    def row_topk_select(self, dtype, values, indices, scores, scores_stride, n_rows, width, k, stream):
        T = _FLOATS[dtype]
        s = _at(scores, T, (n_rows, width), (scores_stride, 1))
        # the k largest (ties to the lower index), listed in index order
        chosen = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        _at(values, T, (n_rows, k), (k, 1)).copy_(s.gather(1, chosen))
        _at(indices, torch.int64, (n_rows, k), (k, 1)).copy_(chosen)

    def head_partial_sums(self, dtype, index_dtype, out, x, x_stride, sub, indices, indices_stride, table,
                          table_stride_latent, table_stride_feature, n_rows, m, n_heads, d_head, stream):  # fmt: skip
        T = _FLOATS[dtype]
        d = n_heads * d_head
        xc = _at(x, T, (n_rows, d), (x_stride, 1)).float()
        if sub:
            xc = xc - _at(sub, T, (1, d), (d, 1)).float()
        idx = _at(indices, _INDEX[index_dtype], (n_rows, m), (indices_stride, 1)).long()
        rows = int(idx.max()) + 1 if idx.numel() else 0
        W = _at(table, T, (rows, d), (table_stride_latent, table_stride_feature)).float()
        parts = (W[idx] * xc[:, None, :]).view(n_rows, m, n_heads, d_head).sum(-1)
        _at(out, T, (n_rows * m, n_heads), (n_heads, 1)).copy_(parts.view(-1, n_heads))

    MATRYOSHKA_COLUMNS = 256

    def _matryoshka_code(self, dtype, index_dtype, values, values_stride, indices, indices_stride, ends, ends_stride,
                         table, table_stride, y, y_stride, n_rows, m, d, n_levels):  # fmt: skip
        T = _FLOATS[dtype]
        v = _at(values, T, (n_rows, m), (values_stride, 1)).float()
        idx = _at(indices, _INDEX[index_dtype], (n_rows, m), (indices_stride, 1)).long()
        assert (idx.diff(dim=1) >= 0).all(), "each row of the code is in latent order"
        run_ends = _at(ends, torch.int32, (n_rows, n_levels), (ends_stride, 1)).long()
        assert (run_ends[:, -1] == m).all() and (run_ends.diff(dim=1) >= 0).all()
        lev = (torch.arange(m)[None, :, None] >= run_ends[:, None, :]).sum(-1)  # each slot's level from the runs
        rows = int(idx.max()) + 1 if idx.numel() else 0
        W = _at(table, T, (rows, d), (table_stride, 1)).float()
        return T, v, idx, lev, W, _at(y, T, (n_rows, d), (y_stride, 1)).float()

    def matryoshka_decode_loss(self, dtype, index_dtype, recon, recon_stride, sq_part, values, values_stride,
                               indices, indices_stride, ends, ends_stride, table, table_stride, y, y_stride, bias,
                               n_rows, m, d, n_levels, stream):  # fmt: skip
        T, v, idx, lev, W, yy = self._matryoshka_code(dtype, index_dtype, values, values_stride, indices,
                                                      indices_stride, ends, ends_stride, table, table_stride, y,
                                                      y_stride, n_rows, m, d, n_levels)  # fmt: skip
        b = _at(bias, T, (1, d), (d, 1)).float() if bias else torch.zeros(1, d)
        acc, sq = torch.zeros(n_rows, d), torch.zeros(n_rows, n_levels)
        for level in range(n_levels):  # levels in order, the zero values skipped
            for j in range(m):
                live = (lev[:, j] == level) & (v[:, j] != 0)
                acc += torch.where(live[:, None], v[:, j : j + 1] * W[idx[:, j]], 0.0)
            sq[:, level] = (acc - (yy - b)).pow(2).sum(-1)
        _at(recon, T, (n_rows, d), (recon_stride, 1)).copy_(acc + b)
        # one column block holds every column here; the zero-filled blocks after it add nothing
        _at(sq_part, torch.float32, (n_rows, n_levels), (n_levels, 1)).copy_(sq)

    def matryoshka_decode_loss_backward(self, dtype, index_dtype, dv_part, suffix, dy, dy_stride, values,
                                        values_stride, indices, indices_stride, ends, ends_stride, table,
                                        table_stride, y, y_stride, recon, recon_stride, grad_recon, grad_recon_stride,
                                        grad_sq, grad_sq_stride, n_rows, m, d, n_levels, stream):  # fmt: skip
        T, v, idx, lev, W, yy = self._matryoshka_code(dtype, index_dtype, values, values_stride, indices,
                                                      indices_stride, ends, ends_stride, table, table_stride, y,
                                                      y_stride, n_rows, m, d, n_levels)  # fmt: skip
        err = _at(recon, T, (n_rows, d), (recon_stride, 1)).float() - yy
        s = _at(grad_recon, T, (n_rows, d), (grad_recon_stride, 1)).float() if grad_recon else torch.zeros(n_rows, d)
        g = _at(grad_sq, T, (n_rows, n_levels), (grad_sq_stride, 1)).float()
        d_y, dv, table_s = torch.zeros(n_rows, d), torch.zeros(n_rows, m), torch.zeros(n_rows, n_levels, d)
        for level in reversed(range(n_levels)):
            step = 2 * g[:, level : level + 1] * err
            s, d_y = s + step, d_y - step
            table_s[:, level] = s
            for j in range(m):
                mine = lev[:, j] == level
                w = W[idx[:, j]]
                dv[:, j] = torch.where(mine, (s * w).sum(-1), dv[:, j])
                err -= torch.where(mine[:, None], v[:, j : j + 1] * w, 0.0)
        _at(suffix, T, (n_rows * n_levels, d), (d, 1)).copy_(table_s.view(-1, d))
        _at(dy, T, (n_rows, d), (dy_stride, 1)).copy_(d_y)
        _at(dv_part, torch.float32, (n_rows, m), (m, 1)).copy_(dv)


def _parameters(doc: str) -> list[str]:
    """Parameter names from a pybind11 signature line ``name(a: int, b: int) -> None``."""
    inside = doc.split("(", 1)[1].split(")", 1)[0]
    return [part.split(":")[0].strip() for part in inside.split(",")]


def test_the_emulation_has_the_bindings_signatures():
    import inspect

    module = _C()
    for name in LAUNCHERS:
        emulated = list(inspect.signature(getattr(EmulatedLaunchers(), name)).parameters)
        assert _parameters(getattr(module, name).__doc__) == emulated, name


@pytest.fixture
def emulated(monkeypatch):
    """Runs backends/cuda.py's launchers on CPU tensors against :class:`EmulatedLaunchers`."""
    monkeypatch.setattr(cuda_backend, "extension", lambda: (EmulatedLaunchers(), ""))
    monkeypatch.setattr(cuda_backend, "_device_guard", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(cuda_backend, "_stream", lambda t: 0)
    return cuda_backend


def _weights(d_in, d_sae, dtype):
    return (
        torch.randn(d_in, d_sae, dtype=dtype) / d_in**0.5,
        0.3 * torch.randn(d_in, dtype=dtype),
        torch.randn(d_sae, d_in, dtype=dtype) / d_in**0.5,
    )


def _close(actual, baseline, exact, name, long_sums=False):
    """fp32: torch.testing defaults against the exact result; bf16/fp16, and fp32 sums over thousands of terms
    (``long_sums``, whose rounding grows with their length): STYLE §10 (2x plain PyTorch's error)."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}"
    if actual.numel() == 0:  # e.g. db_dec without centring: [0] in both
        return
    if actual.dtype in LOWP or long_sums:
        assert_close_lowp(actual, baseline, exact, name)
    else:
        torch.testing.assert_close(actual, exact.to(actual.dtype), msg=name)


def _f64(*args):
    """The arguments with every floating-point tensor in float64 (the same rounded inputs, computed exactly)."""
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_emulated_sparse_decoder_forward_and_backward(emulated, dtype, index_dtype):
    n, d_in, d_sae, k = 6, 13, 40, 5
    _, b_dec, W_dec = _weights(d_in, d_sae, dtype)
    values = torch.randn(n, 2 * k, dtype=dtype)[:, :k]  # a column slice: row stride 2k, not k
    values[1, 2:] = 0  # BatchTopK-style padding: value 0 at latent 0
    indices = torch.stack([torch.randperm(d_sae)[: 3 * k] for _ in range(n)]).to(index_dtype)[:, k : 2 * k]
    indices[1, 2:] = 0
    indices[0, 0] = indices[0, 1]  # a repeated latent adds up
    grad = torch.randn(n, d_in + 3, dtype=dtype)[:, 3:]
    for b in (b_dec, None):
        out = emulated.sparse_decode(values, indices, W_dec, b)
        _close(out, reference.sparse_decode(values, indices, W_dec, b),
               reference.sparse_decode(*_f64(values, indices, W_dec, b)), "sparse_decode")  # fmt: skip
    d_values, dW_dec = emulated.sparse_decode_backward(grad, values, indices, W_dec)
    base = reference.sparse_decode_backward(grad, values, indices, W_dec)
    exact = reference.sparse_decode_backward(*_f64(grad, values, indices, W_dec))
    _close(d_values, base[0], exact[0], "d_values")
    _close(dW_dec, base[1], exact[1], "dW_dec")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "d_sae"), [(7, 24), (2, 4096)])  # W_enc transposed once / read in place
@pytest.mark.parametrize("center", [True, False])
def test_emulated_sparse_encode_backward(emulated, dtype, n, d_sae, center):
    d_in, m = 11, 3
    W_enc, b_dec, _ = _weights(d_in, d_sae, dtype)
    b = b_dec if center else None
    x = torch.randn(n, d_in, dtype=dtype)
    grad = torch.randn(n, m, dtype=dtype)
    grad[0, 1] = 0
    indices = torch.randint(0, d_sae, (n, m), dtype=torch.int32)
    ours = emulated.sparse_encode_backward(grad, indices, x, W_enc, b, True)
    base = reference.sparse_encode_backward(grad, indices, x, W_enc, b, True)
    exact = reference.sparse_encode_backward(*_f64(grad, indices, x, W_enc, b), True)
    for name, a, bb, e in zip(["dx", "dW_enc", "db_enc", "db_dec"], ours, base, exact):
        assert a.shape == e.shape, name
        _close(a, bb, e, name)
    no_dx = emulated.sparse_encode_backward(grad, indices, x, W_enc, b, False)
    assert no_dx[0].numel() == 0 and torch.equal(no_dx[1], ours[1])


def test_emulated_row_topk_and_topk_encode(emulated):
    scores = torch.randint(-3, 4, (9, 2 * 31)).float()[:, 1::2]  # ties everywhere; strided columns get copied
    scores[2] = -1.5  # all equal and negative
    for k in (1, 4, 31):
        values, indices = emulated.row_topk(scores, k)
        expected_v, expected_i = naive.topk_select(scores, k)
        assert torch.equal(indices, expected_i) and torch.equal(values, expected_v)
    x = torch.randn(5, 8)
    W_enc, b_dec, _ = _weights(8, 20, torch.float32)
    b_enc = torch.randn(20)
    mask = torch.rand(20) < 0.5
    mask[:3] = True
    ours = emulated.topk_encode(x, W_enc, b_enc, b_dec, 4, 3, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, 4, 3, mask)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_matryoshka_decode_loss(emulated, dtype):
    """The launchers of matryoshka_decode_loss and its backward: partial buffers summed over column blocks, the
    suffix table and the latent segments re-addressed to (token, level) rows for segment_sum_rows."""
    n, d, d_sae, m, widths = 7, 13, 30, 5, [4, 11, 30]
    _, b_dec, W_dec = _weights(d, d_sae, dtype)
    values = torch.rand(n, m, dtype=dtype)
    values[2, 3:] = 0  # padding at latent 0
    indices = torch.stack([torch.randperm(d_sae)[:m] for _ in range(n)]).to(torch.int32)
    indices[2, 3:] = 0
    y = torch.randn(n, d, dtype=dtype)
    grad_recon, grad_sq = torch.randn(n, d, dtype=dtype), torch.randn(n, len(widths), dtype=dtype)
    args = (values, indices, W_dec, b_dec, y, widths)
    recon, sq = emulated.matryoshka_decode_loss(*args)
    expected = reference.matryoshka_decode_loss(*_f64(*args))
    baseline = reference.matryoshka_decode_loss(*args)
    _close(recon, baseline[0], expected[0], "recon")
    _close(sq, baseline[1], expected[1], "sq_err", long_sums=True)
    for g in (grad_recon, None):
        back = (g, grad_sq, values, indices, W_dec, y, recon, widths)
        ours = emulated.matryoshka_decode_loss_backward(*back)
        base = reference.matryoshka_decode_loss_backward(*back)
        exact = reference.matryoshka_decode_loss_backward(*_f64(*back))
        for name, a, bb, e in zip(["d_values", "dW_dec", "db_dec", "dy"], ours, base, exact):
            _close(a, bb, e, name, long_sums=True)


@pytest.mark.parametrize(("n", "d_sae"), [(6, 16), (1, 4096)])
def test_emulated_head_partial_sums(emulated, n, d_sae):
    n_heads, d_head, m = 3, 5, 4
    d_in = n_heads * d_head
    W_enc, b_dec, _ = _weights(d_in, d_sae, torch.float32)
    x = torch.randn(n, d_in)
    indices = torch.randint(0, d_sae, (n, m))
    for b in (b_dec, None):
        torch.testing.assert_close(
            emulated.head_partial_sums(x, W_enc, b, indices, n_heads),
            reference.head_partial_sums(*_f64(x, W_enc, b, indices, n_heads)).float(),
        )


# ---------------------------------------------------------------------------------------------------------------
# the kernels (GPU)
# ---------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
# (N, d_in, d_sae, k): d_in 13 and 33 take the scalar path (no 16-byte rows), 16/768 the vector path; k = 1; k = d_sae
SHAPES = [(5, 16, 32, 4), (7, 13, 40, 1), (4, 13, 24, 24), (9, 33, 65, 7), (64, 768, 4096, 32)]


@pytest.fixture
def on_gpu():
    """The cuda backend on a GPU: skipped without CUDA; a failure if the GPU is there but the backend is not."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _C()
    ok, why = cuda_backend.availability()
    assert ok, f"a GPU is visible but the cuda backend cannot run: {why}"
    return torch.device("cuda")


def _rand(*shape, dtype, device, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64, device=device)).to(dtype)


def _on(name, fn, *args):
    with backends.use(name):
        return fn(*args)


def _check_against_reference(op, args, names, long_sums=False):
    """Runs ``op`` through the cuda backend and compares every output with the reference: exactly computed in
    float64 from the same (rounded) inputs, and plain PyTorch at the same precision as the STYLE §10 baseline."""
    fn = getattr(torch.ops.fusedsae, op)
    ours = _on("cuda", fn, *args)
    dense = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in args]  # the reference's usual layout
    base = _on("reference", fn, *dense)
    exact = _on("reference", fn, *_f64(*dense))
    ours, base, exact = [(t,) if isinstance(t, torch.Tensor) else t for t in (ours, base, exact)]
    for name, a, b, e in zip(names, ours, base, exact):
        assert a.shape == e.shape and a.dtype == b.dtype, name
        _close(a, b, e, f"{op} {name}", long_sums)
    return ours


def _indices(n, k, d_sae, index_dtype, device):
    idx = torch.stack([torch.randperm(d_sae, device=device)[:k] for _ in range(n)]).to(index_dtype)
    idx[0, 0] = idx[0, -1]  # a repeated latent in one row adds up
    return idx


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sparse_decode_forward_and_backward(on_gpu, shape, dtype, index_dtype):
    n, d_in, d_sae, k = shape
    values = _rand(n, k, dtype=dtype, device=on_gpu)
    values[-1, k // 2 :] = 0  # padding-like zero slots
    indices = _indices(n, k, d_sae, index_dtype, on_gpu)
    W_dec = _rand(d_sae, d_in, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu, scale=0.3)
    grad = _rand(n, d_in, dtype=dtype, device=on_gpu)
    for b in (b_dec, None):
        _check_against_reference("sparse_decode", (values, indices, W_dec, b), ["x_hat"])
    _check_against_reference("sparse_decode_backward", (grad, values, indices, W_dec), ["d_values", "dW_dec"])
    # strided views: a column slice of values/indices, W_dec read through a transposed view
    wide_v = _rand(n, 2 * k, dtype=dtype, device=on_gpu)
    wide_i = torch.cat([indices, indices], 1)
    W_t = W_dec.t().contiguous().t()
    _check_against_reference("sparse_decode", (wide_v[:, ::2], wide_i[:, ::2], W_t, b_dec), ["x_hat (strided)"])
    _check_against_reference(
        "sparse_decode_backward", (grad, wide_v[:, k:], wide_i[:, k:], W_t), ["d_values (strided)", "dW_dec"]
    )


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [True, False])
def test_sparse_encode_backward(on_gpu, shape, dtype, center):
    n, d_in, d_sae, k = shape
    grad = _rand(n, k, dtype=dtype, device=on_gpu)
    grad[0, 0] = 0
    indices = _indices(n, k, d_sae, torch.int64, on_gpu)
    x = _rand(n, d_in, dtype=dtype, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu, scale=0.3) if center else None
    names = ["dx", "dW_enc", "db_enc", "db_dec"]
    for need_dx in (True, False):
        _check_against_reference("sparse_encode_backward", (grad, indices, x, W_enc, b_dec, need_dx), names)
    # int32 indices; W_enc latent-major (a transposed view) and, with few tokens, read in place by columns
    _check_against_reference(
        "sparse_encode_backward", (grad, indices.int(), x, W_enc.t().contiguous().t(), b_dec, True), names
    )
    _check_against_reference(
        "sparse_encode_backward", (grad[:1, :2], indices[:1, :2], x[:1], W_enc, b_dec, True), names
    )


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_topk_exact_with_ties_and_negative_rows(on_gpu, dtype):
    for width in (1, 7, 30, 513, 4099):
        scores = torch.randint(-3, 4, (12, width), device=on_gpu).to(dtype)  # many exact ties
        scores[3] = 1.0  # all equal
        scores[4] = -2.0 - torch.arange(width, device=on_gpu).to(dtype) % 3  # all negative
        scores[5, ::2] = float("-inf")
        scores[6] = -0.0  # -0.0 ties with +0.0
        scores[6, 1::3] = 0.0
        scores[7] = torch.randn(width, device=on_gpu).to(dtype)
        for k in sorted({1, max(1, width // 4), width}):
            values, indices = _on("cuda", F.row_topk, scores, k)
            expected_v, expected_i = _on("reference", F.row_topk, scores, k)
            assert torch.equal(indices, expected_i), (width, k)
            assert torch.equal(values, expected_v), (width, k)
        if width >= 30:
            small = scores[:, :30].cpu().double()
            values, indices = _on("cuda", F.row_topk, scores[:, :30], 5)  # a column slice: strided rows
            assert torch.equal(indices.cpu(), naive.topk_select(small, 5)[1])


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_topk_on_rows_of_a_million_latents(on_gpu, dtype):
    width = 1 << 20
    scores = torch.randn(3, width, device=on_gpu).to(dtype)
    scores[1] = torch.randint(-50, 50, (width,), device=on_gpu).to(dtype)  # ~10k copies of every value
    scores[2, : width // 2] = -1.0
    for k in (1, 64, 1000):
        values, indices = _on("cuda", F.row_topk, scores, k)
        expected_v, expected_i = _on("reference", F.row_topk, scores, k)
        assert torch.equal(indices, expected_i), k
        assert torch.equal(values, expected_v), k
    again = _on("cuda", F.row_topk, scores, 64)
    assert all(torch.equal(a, b) for a, b in zip(again, _on("cuda", F.row_topk, scores, 64)))


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_encode_unfused_path(on_gpu, shape, dtype):
    n, d_in, d_sae, k = shape
    x = _rand(n, d_in, dtype=dtype, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    b_enc = _rand(d_sae, dtype=dtype, device=on_gpu, scale=0.3)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu, scale=0.3)
    mask = torch.rand(d_sae, device=on_gpu) < 0.5
    mask[:2] = True
    aux_k = min(2, d_sae)
    # Same GEMM, same chunks as the reference: the same pre-activations, so the same selections bit for bit.
    ours = _on("cuda", torch.ops.fusedsae.topk_encode, x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = _on("reference", torch.ops.fusedsae.topk_encode, x, W_enc, b_enc, b_dec, k, aux_k, mask)
    for a, e in zip(ours, expected):
        assert torch.equal(a, e)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize(("n", "d_sae"), [(33, 64), (2, 8192)])  # W_enc transposed once / read by columns
@pytest.mark.parametrize("n_heads", [3, 12])
def test_head_partial_sums(on_gpu, dtype, index_dtype, n, d_sae, n_heads):
    d_head = 32 if n_heads == 12 else 7
    d_in = n_heads * d_head
    x = _rand(n, d_in, dtype=dtype, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu, scale=0.3)
    indices = torch.randint(0, d_sae, (n, 5), device=on_gpu).to(index_dtype)
    for b in (b_dec, None):
        _check_against_reference("head_partial_sums", (x, W_enc, b, indices, n_heads), ["parts"])


@gpu
@pytest.mark.parametrize("center", [True, False])
def test_training_gradients_through_the_cuda_backward_ops(on_gpu, center):
    """TopK encode + sparse decode + MSE + AuxK: every gradient through the cuda backend's ops in float32, held to
    STYLE §10 against float64: the loss's chain of fp32 roundings (x_hat - target cancels) puts the plain PyTorch
    error itself at tens of ulps on some entries, so the torch.testing defaults would test luck."""
    n, d_in, d_sae, k = 48, 40, 96, 6
    inputs64 = [
        _rand(n, d_in, dtype=torch.float64, device=on_gpu),
        _rand(d_in, d_sae, dtype=torch.float64, device=on_gpu, scale=d_in**-0.5),
        _rand(d_sae, dtype=torch.float64, device=on_gpu, scale=0.3),
        _rand(d_in, dtype=torch.float64, device=on_gpu, scale=0.3),
        _rand(d_sae, d_in, dtype=torch.float64, device=on_gpu, scale=d_in**-0.5),
    ]
    target = _rand(n, d_in, dtype=torch.float64, device=on_gpu)
    mask = torch.ones(d_sae, dtype=torch.bool, device=on_gpu)

    def loss_and_grads(tensors, backend):
        leaves = [t.clone().requires_grad_() for t in tensors]
        x, W_enc, b_enc, b_dec, W_dec = leaves
        with backends.use(backend):
            code = F.topk_encode(x, W_enc, b_enc, b_dec if center else None, k=k, aux_k=4, aux_mask=mask)
            out = F.sparse_decode(code.values, code.indices, W_dec, b_dec)
            aux = F.sparse_decode(code.aux_values, code.aux_indices, W_dec)
            loss = (out - target.to(out.dtype)).pow(2).sum() + aux.pow(2).sum()
        return code.indices, torch.autograd.grad(loss, leaves)

    idx, ours = loss_and_grads([t.float() for t in inputs64], "cuda")
    idx_base, baseline = loss_and_grads([t.float() for t in inputs64], "reference")
    idx_exact, exact = loss_and_grads([t.float().double() for t in inputs64], "reference")
    assert torch.equal(idx, idx_base) and torch.equal(idx, idx_exact)
    for name, a, b, e in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], ours, baseline, exact):
        assert_close_lowp(a, b, e, f"d{name}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernels_are_bitwise_repeatable(on_gpu, dtype):
    n, d_in, d_sae, k = 4096, 72, 64, 16  # ~1000 entries per latent: any change of summation order would show
    values = _rand(n, k, dtype=dtype, device=on_gpu)
    indices = torch.randint(0, d_sae, (n, k), device=on_gpu)
    grad = _rand(n, d_in, dtype=dtype, device=on_gpu)
    x = _rand(n, d_in, dtype=dtype, device=on_gpu)
    W_dec = _rand(d_sae, d_in, dtype=dtype, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=dtype, device=on_gpu)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu)
    with backends.use("cuda"):
        runs = [
            (
                *torch.ops.fusedsae.sparse_decode_backward(grad, values, indices, W_dec),
                *torch.ops.fusedsae.sparse_encode_backward(values, indices, x, W_enc, b_dec, True),
                *torch.ops.fusedsae.row_topk(grad, 5),
            )
            for _ in range(3)
        ]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_ops_at_a_real_size_with_a_hot_latent(on_gpu, dtype):
    """The paths small shapes never reach, against the reference: d_in = 4096 (several column blocks per gathered
    row), d_head = 64 (a head's columns loop), k = 64 (the per-warp latent loop wraps), and one latent active in
    every row, so one per-latent sum of dW_dec, dW_enc and db_enc runs over 2048 entries."""
    n, d_in, d_sae, k, n_heads = 2048, 4096, 16384, 64, 64
    x = _rand(n, d_in, dtype=dtype, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    W_dec = _rand(d_sae, d_in, dtype=dtype, device=on_gpu, scale=d_in**-0.5)
    b_dec = _rand(d_in, dtype=dtype, device=on_gpu, scale=0.3)
    values = _rand(n, k, dtype=dtype, device=on_gpu)
    indices = _indices(n, k, d_sae, torch.int64, on_gpu)
    indices[:, 0] = 7  # the hot latent (a row may hold it twice: that adds up)
    grad = _rand(n, d_in, dtype=dtype, device=on_gpu)
    _check_against_reference("sparse_decode", (values, indices, W_dec, b_dec), ["x_hat"])
    _check_against_reference(
        "sparse_decode_backward", (grad, values, indices, W_dec), ["d_values", "dW_dec"], long_sums=True
    )
    _check_against_reference(
        "sparse_encode_backward",
        (values, indices, x, W_enc, b_dec, True),
        ["dx", "dW_enc", "db_enc", "db_dec"],
        long_sums=True,
    )
    _check_against_reference("head_partial_sums", (x, W_enc, b_dec, indices, n_heads), ["parts"])


@gpu
def test_padding_slots_do_not_train_latent_zero(on_gpu):
    """BatchTopK's padded form: value 0 at index 0 adds nothing to dW_dec[0] (the decoder backward's per-latent
    sums; the encoder backward shares them)."""
    n, d_in, d_sae = 300, 24, 10
    values = torch.zeros(n, 4, device=on_gpu)
    indices = torch.zeros(n, 4, dtype=torch.int64, device=on_gpu)
    values[:, 0] = torch.randn(n, device=on_gpu)
    indices[:, 0] = torch.randint(1, d_sae, (n,), device=on_gpu)
    indices[7, 1], values[7, 1] = 0, 2.0  # one real use of latent 0
    grad = torch.randn(n, d_in, device=on_gpu)
    W_dec = torch.randn(d_sae, d_in, device=on_gpu)
    _check_against_reference("sparse_decode_backward", (grad, values, indices, W_dec), ["d_values", "dW_dec"])
    _, dW_dec = _on("cuda", torch.ops.fusedsae.sparse_decode_backward, grad, values, indices, W_dec)
    torch.testing.assert_close(dW_dec[0], 2.0 * grad[7])


@gpu
def test_sparse_decode_with_more_than_2_31_output_elements(on_gpu):
    """64-bit offsets: an output of 2.25e9 bf16 elements (4.5 GB); rows checked at both ends."""
    n, d_in, d_sae, k = 2_200_000, 1024, 64, 2
    if torch.cuda.get_device_properties(on_gpu).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GB of GPU memory")
    values = torch.randn(n, k, device=on_gpu).bfloat16()
    indices = torch.randint(0, d_sae, (n, k), device=on_gpu)
    W_dec = torch.randn(d_sae, d_in, device=on_gpu).bfloat16()
    out = _on("cuda", F.sparse_decode, values, indices, W_dec)
    for rows in (slice(0, 3), slice(n - 3, n)):
        expected = (values[rows, :, None].double() * W_dec[indices[rows]].double()).sum(1)
        torch.testing.assert_close(out[rows].double(), expected, rtol=2**-7, atol=1e-3)  # one bf16 rounding


@gpu
@pytest.mark.parametrize("op", sorted(CUDA_OPS))
def test_opcheck_on_the_cuda_backend(on_gpu, op):
    cases = opcheck_cases(torch.float32, on_gpu)
    with backends.use("cuda"):
        torch.library.opcheck(getattr(torch.ops.fusedsae, op).default, cases[op])


@gpu
def test_explicit_cuda_refuses_inputs_it_has_no_kernel_for(on_gpu):
    values = torch.randn(3, 2, dtype=torch.float64, device=on_gpu)
    indices = torch.randint(0, 5, (3, 2), device=on_gpu)
    W_dec = torch.randn(5, 4, dtype=torch.float64, device=on_gpu)
    with backends.use("cuda"), pytest.raises(backends.BackendError, match="float32, bfloat16 or float16"):
        F.sparse_decode(values, indices, W_dec)
    with backends.use("cuda"), pytest.raises(backends.BackendError, match="CUDA tensors"):
        torch.ops.fusedsae.sparse_decode(values.float(), indices.cpu(), W_dec.float(), None)


@gpu
def test_chunked_segment_sums_with_hot_latents_repeat_bitwise(on_gpu):
    """Latent 3 fires on every token (its 4099 entries span 65 chunks of 64: the combine pass), latent 0 takes
    zero-weight padding slots (BatchTopK's), the rest is uniform: against the reference, and bitwise equal twice."""
    n, d_in, d_sae, k = 4099, 200, 1000, 6
    x = _rand(n, d_in, dtype=torch.float32, device=on_gpu)
    W_enc = _rand(d_in, d_sae, dtype=torch.float32, device=on_gpu, scale=d_in**-0.5)
    W_dec = _rand(d_sae, d_in, dtype=torch.float32, device=on_gpu, scale=d_in**-0.5)
    values = _rand(n, k, dtype=torch.float32, device=on_gpu)
    indices = _indices(n, k, d_sae, torch.int64, on_gpu)
    indices[:, 0] = 3
    values[::2, -1] = 0.0
    indices[::2, -1] = 0
    grad = _rand(n, d_in, dtype=torch.float32, device=on_gpu)
    runs = [
        (
            _on("cuda", torch.ops.fusedsae.sparse_decode_backward, grad, values, indices, W_dec),
            _on("cuda", torch.ops.fusedsae.sparse_encode_backward, values, indices, x, W_enc, None, False),
        )
        for _ in range(2)
    ]
    (dec, enc), (dec2, enc2) = runs
    assert torch.equal(dec[1], dec2[1]) and torch.equal(enc[1], enc2[1]) and torch.equal(enc[2], enc2[2])
    _check_against_reference(
        "sparse_decode_backward", (grad, values, indices, W_dec), ["d_values", "dW_dec"], long_sums=True
    )
    _check_against_reference(
        "sparse_encode_backward",
        (values, indices, x, W_enc, None, False),
        ["dx", "dW_enc", "db_enc", "db_dec"],
        long_sums=True,
    )
