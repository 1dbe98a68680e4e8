"""The benchmarks measure what users run: the realistic batch's firing rates follow a power law (a few hot latents,
a long tail) on the SAE's own selection, the dead-latent row really runs AuxK, and the Trainer's step is the one
timed. Small CPU shapes; the timings themselves are not tested."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import providers

CASE = providers.Case("test", 4096, 64, 2048, 8, torch.float32, "cpu")


@pytest.fixture(autouse=True)
def _fresh_caches():
    providers.release()
    yield
    providers.release()


def test_realistic_batch_fires_with_a_power_law():
    batch = providers.realistic(CASE)
    profile = batch.profile
    # measured on the SAE's own selection: the same latents the SAE picks for x
    sae = providers.make_sae(CASE)
    _, indices = sae.encode_sparse(batch.x)
    assert torch.equal(indices, batch.indices)
    # a few hot latents: the hottest fires on >= 10% of tokens, and fewer than 1% of latents do
    assert profile["top_rates"][0] >= 0.10, profile
    assert 1 <= profile["latents_over_10pct"] <= CASE.d_sae // 100, profile
    # a long tail: log(rate) falls linearly with log(rank), slope near -ALPHA (saturation of the hottest and the
    # k-th slots filled by noise flatten it a little), not the flat profile of Gaussian inputs
    assert -1.2 * providers.ALPHA <= profile["loglog_slope"] <= -0.5 * providers.ALPHA, profile
    uniform = providers.firing_profile(torch.randint(0, CASE.d_sae, (CASE.n, CASE.k)), None, CASE.d_sae)
    assert uniform["loglog_slope"] > -0.2 and uniform["latents_over_10pct"] == 0, uniform


def test_dead_mask_takes_the_coldest_latents():
    dead = providers.dead_mask(CASE, 0.2)
    assert int(dead.sum()) == round(0.2 * CASE.d_sae)
    counts = torch.bincount(providers.realistic(CASE).indices.reshape(-1), minlength=CASE.d_sae)
    assert counts[dead].max() <= counts[~dead].min()


@pytest.mark.parametrize("dead_fraction", [0.0, 0.2])
def test_train_step_is_the_trainers_with_auxk_when_latents_are_dead(dead_fraction):
    case = providers.Case("step", 64, 16, 128, 4, torch.float32, "cpu")
    step = providers.train_step("reference", case, dead_fraction=dead_fraction)
    sae_before = providers.make_sae(case)
    step()
    # AuxK's term is absent without dead latents, or (static shapes) present and exactly 0
    aux = float(step.losses.get("auxiliary_reconstruction_loss", 0.0))
    assert (aux > 0) == (dead_fraction > 0), step.losses
    assert providers.make_sae(case).cfg.aux_k == case.d_in // 2  # the default, not the benchmarks' own
    assert sae_before.cfg.normalize_decoder and sae_before.check_finite


def test_ratios_against_the_targets():
    import report

    case = providers.Case("c", 100, 8, 32, 2, torch.float32, "cpu")

    def row(suite, provider, seconds, **extra):
        return report.make_row(suite, case, provider, seconds, seconds, 1, **extra)

    rows = [
        row(report.FLOOR, "gemm", 1.0),
        row(report.FLOOR, "copy", 1.0, nbytes=100e9),  # 100 GB/s
        row(report.STEP, "triton", 1.5, host_syncs=0, peak_mem_gib=1.0),
        row(report.STEP, "torch-unfused", 6.0),
        row(report.STEP, "sparsify", 2.0, peak_mem_gib=1.5),
        row(report.STEP_DEAD, "triton", 2.0),
        row(report.suite_name(report.DECODER, "uniform"), "triton", 1.0, nbytes=90e9),
        row(report.suite_name(report.ENC_BWD, "uniform"), "triton", 1.0),
        row(report.suite_name(report.ENC_BWD, "power-law"), "triton", 3.0),
    ]
    got = {t["ratio"]: (t["value"], t["met"]) for t in report.targets(rows)}
    assert got == {
        "step / GEMM": (1.5, True),
        "speed-up vs torch-unfused": (4.0, False),
        "speed-up vs sparsify": (1.333, False),
        "host syncs per step": (0, True),
        "peak memory / sparsify's": (0.667, False),
        "step 20% dead / 0% dead": (1.333, False),
        "decoder fwd+bwd % copy BW, uniform": (90.0, True),
        "encoder backward power-law / uniform": (3.0, False),
    }
    assert "| c | triton | step / GEMM | 1.5 | <= 1.7 | yes |" in report.targets_table(report.targets(rows))
