"""A full TopK training step per provider, with the encoder GEMM as the floor. fusedsae's step is the Trainer's
(AuxK at its default aux_k, normalised decoder, finite check, fused Adam, clipping) on a batch with power-law firing
rates; the table reports time, x GEMM, tokens/s, host syncs per step and peak memory.

Targets (docs/architecture.md#targets, issue 8): on an H100, <= 1.7x the GEMM, >= 5x faster than torch-unfused,
>= 2x faster than sparsify, zero host syncs, peak memory <= 0.5x sparsify's; a step with 20% dead latents <= 1.2x one
with none."""

from __future__ import annotations

import pytest

import providers
import report

STEP_PROVIDERS = ["reference", "triton", "cuda", "torch-unfused", "sae-lens", "sparsify"]


def test_gemm_floor(case, measure):
    measure(report.FLOOR, case, "gemm", providers.gemm(case), flops=case.gemm_flops)


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_train_step(case, provider, measure):
    measure(report.STEP, case, provider, providers.train_step(provider, case), profile=True)


@pytest.mark.parametrize("provider", providers.FUSEDSAE_PROVIDERS)
def test_train_step_dead_latents(case, provider, measure):
    step = providers.train_step(provider, case, dead_fraction=0.2)
    measure(report.STEP_DEAD, case, provider, step, profile=True)
