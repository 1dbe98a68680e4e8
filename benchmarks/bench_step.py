"""A full TopK training step (forward, MSE loss, backward, Adam) per provider, with the encoder GEMM as the floor.

Targets (docs/architecture.md#targets): on the CPU (foundation issue), our step <= 1.5x our encoder GEMM and >= 3x
faster than SAELens; on an H100, <= 1.7x the GEMM and >= 5x faster than torch-unfused."""

from __future__ import annotations

import pytest

import providers

STEP_PROVIDERS = ["reference", "triton", "cuda", "torch-unfused", "sae-lens", "sparsify"]


def test_gemm_floor(case, measure):
    measure("floor", case, "gemm", providers.gemm(case), flops=case.gemm_flops)


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_train_step(case, provider, measure):
    measure("train step", case, provider, providers.train_step(provider, case))
