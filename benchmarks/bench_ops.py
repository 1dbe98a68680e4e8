"""Single ops per provider: the encoder with TopK selection (forward) and the encoder's backward against the GEMM
floor, and the sparse decoder forward + backward against the measured copy bandwidth."""

from __future__ import annotations

import pytest

import providers

OP_PROVIDERS = ["reference", "triton", "cuda", "torch-unfused"]


def test_copy_bandwidth(case, measure):
    run = providers.copy(case)
    measure("floor", case, "copy", run, nbytes=run.bytes)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_encoder_topk(case, provider, measure):
    measure("encoder+topk forward", case, provider, providers.encoder_topk(provider, case), flops=case.gemm_flops)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_decoder_forward_backward(case, provider, measure):
    run = providers.decoder_fwd_bwd(provider, case)
    measure("decoder fwd+bwd", case, provider, run, nbytes=providers.decoder_bytes(case))


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_encoder_backward(case, provider, measure):
    measure("encoder backward", case, provider, providers.encoder_backward(provider, case))
