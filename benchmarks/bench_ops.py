"""Single ops per provider: the encoder with TopK selection (with and without AuxK among 20% dead latents) against
the GEMM floor, the sparse decoder forward + backward against the measured copy bandwidth, and the encoder backward,
each with uniform and with power-law (a few hot latents) active latents."""

from __future__ import annotations

import pytest

import providers
import report

OP_PROVIDERS = ["reference", "triton", "cuda", "torch-unfused"]


def test_copy_bandwidth(case, measure):
    run = providers.copy(case)
    measure(report.FLOOR, case, "copy", run, nbytes=run.bytes)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("aux", [False, True], ids=["topk", "topk+auxk"])
def test_encoder_topk(case, provider, aux, measure):
    suite = report.ENCODER_AUX if aux else report.ENCODER
    measure(suite, case, provider, providers.encoder_topk(provider, case, aux=aux), flops=case.gemm_flops)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("latents", report.LATENTS)
def test_decoder_forward_backward(case, provider, latents, measure):
    run = providers.decoder_fwd_bwd(provider, case, latents)
    measure(report.suite_name(report.DECODER, latents), case, provider, run, nbytes=providers.decoder_bytes(case))


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("latents", report.LATENTS)
def test_encoder_backward(case, provider, latents, measure):
    run = providers.encoder_backward(provider, case, latents)
    measure(report.suite_name(report.ENC_BWD, latents), case, provider, run)
