"""The per-op dispatcher: FUSEDSAE_BACKEND, explicit requests that fail loudly with reasons, silent fallback under
auto, and report()."""

from __future__ import annotations

import pytest
import torch

from fusedsae import backends, reference
from fusedsae import functional as F


def test_report_lists_every_backend_with_a_reason():
    report = backends.report()
    assert set(report) == {"reference", "triton", "cuda"}
    for entry in report.values():
        assert isinstance(entry["available"], bool) and entry["reason"]
    assert report["reference"]["available"]


def test_auto_uses_reference_on_cpu_tensors(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("FUSEDSAE_BACKEND", "auto")
    assert backends.chosen("sparse_decode", x) == "reference"


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    W_enc, b_enc = torch.randn(4, 6), torch.zeros(6)
    monkeypatch.setenv("FUSEDSAE_BACKEND", "cuda")
    with pytest.raises(backends.BackendError, match="FUSEDSAE_BACKEND=cuda cannot run topk_encode: "):
        F.topk_encode(torch.randn(2, 4), W_enc, b_enc, k=2)
    monkeypatch.setenv("FUSEDSAE_BACKEND", "Reference")  # case-insensitive
    F.topk_encode(torch.randn(2, 4), W_enc, b_enc, k=2)
    monkeypatch.setenv("FUSEDSAE_BACKEND", "fast")
    with pytest.raises(backends.BackendError, match="'fast' is not one of auto, reference, triton, cuda"):
        F.topk_encode(torch.randn(2, 4), W_enc, b_enc, k=2)


def test_use_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDSAE_BACKEND", "cuda")
    with backends.use("reference"):
        assert backends.requested() == "reference"
        with backends.use("auto"):
            assert backends.requested() == "auto"
    assert backends.requested() == "cuda"
    with pytest.raises(backends.BackendError, match="unknown backend"), backends.use("nope"):
        pass


def test_auto_falls_back_when_a_backend_refuses(monkeypatch):
    calls = []
    fake = backends.Backend("triton", lambda: (True, "test double"), devices=("cpu",), explicit_devices=("cpu",))

    def fake_decode(*args):
        calls.append("fake")
        return reference.sparse_decode(*args)

    fake.impls["sparse_decode"] = backends.Implementation(
        fake_decode, supports=lambda values, *rest: "values must be float16 (test)"
    )
    monkeypatch.setitem(backends._BACKENDS, "triton", fake)
    values, indices, W = torch.randn(2, 3), torch.randint(0, 5, (2, 3)), torch.randn(5, 4)
    F.sparse_decode(values, indices, W)  # auto: triton refuses, reference runs
    assert calls == []
    with backends.use("triton"), pytest.raises(backends.BackendError, match=r"values must be float16 \(test\)"):
        F.sparse_decode(values, indices, W)
    fake.impls["sparse_decode"].supports = None
    with backends.use("triton"):
        F.sparse_decode(values, indices, W)
    assert calls == ["fake"]


def test_both_backends_decide_the_transposed_copy_by_one_rule():
    # The triton and cuda launchers gather W_enc's latent rows through fusedsae.backends.common.latent_rows, not a
    # rule of their own (they once had two that disagreed).
    from fusedsae.backends import common, cuda

    users = [cuda]
    if backends.report()["triton"]["available"]:
        from fusedsae.backends.triton import heads, sparse

        users += [heads, sparse]
    assert all(module.latent_rows is common.latent_rows for module in users)
    # The copy pays when 2 * d_sae * elt < n_gathers * (32 - elt): 1000 latents in fp32 from 286 gathers, in bf16
    # from 134.
    for dtype, pays_from in ((torch.float32, 286), (torch.bfloat16, 134)):
        W_enc = torch.randn(6, 1000).to(dtype)
        table, stride_latent, stride_feature = common.latent_rows(W_enc, pays_from - 1)
        assert table is W_enc and (stride_latent, stride_feature) == (1, 1000)
        table, stride_latent, stride_feature = common.latent_rows(W_enc, pays_from)
        assert torch.equal(table, W_enc.t()) and table.is_contiguous() and (stride_latent, stride_feature) == (6, 1)
    # a latent-major W_enc (the transposed view of a [d_sae, d_in] tensor) is used in place at any count
    W_latent_major = torch.randn(1000, 6).t()
    table, stride_latent, stride_feature = common.latent_rows(W_latent_major, 10**6)
    assert table is W_latent_major and (stride_latent, stride_feature) == (6, 1)
