"""Per-head partial sums for a fixed feature set at every token (an attribution scan): the gather route (one
gathered W_enc row per token and feature) against the encoder route (the encoder over the requested columns,
K steps aligned to heads, on tensor cores on a GPU)."""

from __future__ import annotations

import pytest
import torch

from fusedsae import reference

FEATURES = 256  # features scanned at every token
D_HEAD = 64


def _inputs(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.n, case.d_in, generator=g).to(case.device, case.dtype)
    W_enc = (torch.randn(case.d_in, case.d_sae, generator=g) / case.d_in**0.5).to(case.device, case.dtype)
    b_enc = torch.zeros(case.d_sae, dtype=case.dtype, device=case.device)
    b_dec = (0.1 * torch.randn(case.d_in, generator=g)).to(case.device, case.dtype)
    features = torch.randperm(case.d_sae, generator=g)[:FEATURES].to(case.device)
    return x, W_enc, b_enc, b_dec, features


@pytest.mark.parametrize("route", ["gather", "encoder"])
def test_head_partials_feature_scan(case, route, measure):
    x, W_enc, b_enc, b_dec, features = _inputs(case)
    heads = case.d_in // D_HEAD
    gpu = case.device == "cuda"
    if gpu:
        import fusedsae.backends.triton as tt
    if route == "gather":
        indices = features.expand(case.n, -1).contiguous()
        if gpu:
            fn = lambda: tt.heads.head_partial_sums(x, W_enc, b_dec, indices, heads)  # noqa: E731
        else:
            fn = lambda: reference.head_partial_sums(x, W_enc, b_dec, indices, heads)  # noqa: E731
    elif gpu:
        fn = lambda: tt.heads.encode_head_partials(x, W_enc, b_enc, b_dec, features, heads)  # noqa: E731
    else:
        fn = lambda: reference.encode_head_partials(x, W_enc, b_enc, b_dec, features, heads)  # noqa: E731
    measure("head partials, feature scan", case, route, fn, flops=2.0 * case.n * FEATURES * case.d_in)
