"""Toy experiments (`fusedsae toy`): the findings the README states hold when the SAEs are trained here, the
learned-basis rule, the command's outputs and its errors."""

from __future__ import annotations

import json

import pytest

from fusedsae import experiments
from fusedsae.cli import main
from fusedsae.experiments import learned_basis, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # small models throughout (conftest.one_thread)


def by_label(name: str, labels: list[str]) -> dict[str, dict]:
    """The rows of the named cases (run_experiment keeps the experiment's case order)."""
    result = run_experiment(name, labels=labels)
    cases = [c for c in experiments.EXPERIMENTS[name].cases() if c.label in labels]
    assert [(r["k"], r["d_sae"]) for r in result.rows] == [(c.k, c.d_sae) for c in cases]
    return {c.label: row for c, row in zip(cases, result.rows)}


def test_composed_features_atomic_with_independent_amplitudes_combinations_with_shared_ones():
    rows = by_label("composed", ["independent-k2-d8", "shared-k1-d16"])
    atomic = rows["independent-k2-d8"]
    assert atomic["basis"] == "atomic", atomic
    assert atomic["recovered_atomic"] == 1.0 and atomic["fvu"] < 0.05
    combined = rows["shared-k1-d16"]
    assert combined["basis"] == "composed", combined
    assert combined["mmcs_atomic"] < experiments.MATCH_MMCS


def test_sparsity_a_too_large_k_reconstructs_better_but_recovers_worse():
    rows = by_label("sparsity", ["k3", "k12"])
    matched, large = rows["k3"], rows["k12"]
    assert matched["basis"] == "true" and matched["recovered_true"] == 1.0, matched
    assert large["fvu"] < matched["fvu"]
    assert large["mmcs_true"] < matched["mmcs_true"] - 0.03, (matched, large)


def test_superposition_is_undone_only_for_sparse_features():
    rows = by_label("superposition", ["s0.0", "s0.9"])
    dense, sparse = rows["s0.0"], rows["s0.9"]
    assert dense["represented"] == 5 and sparse["represented"] > 5  # superposition appears with sparsity
    assert sparse["basis"] == "represented" and dense["basis"] == "neither", (dense, sparse)


def test_learned_basis_rule():
    assert learned_basis({"a": 0.97, "b": 0.7}) == "a"
    assert learned_basis({"a": 0.93, "b": 0.92}) == "mixed"
    assert learned_basis({"a": 0.8, "b": 0.7}) == "neither"
    assert learned_basis({"true": 0.95}) == "true"


def test_toy_command_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    assert main(["toy", "sparsity", "--steps", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mmcs_true" in out and "basis" in out
    record = json.loads((tmp_path / "sparsity.json").read_text())
    assert record["experiment"] == "sparsity" and record["steps"] == 20
    assert [row["k"] for row in record["rows"]] == [1, 3, 6, 12]
    assert all(0.0 <= row["mmcs_true"] <= 1.0 + 1e-6 for row in record["rows"])
    assert (tmp_path / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")
    with pytest.raises(ValueError, match="has no case"):
        run_experiment("sparsity", labels=["k99"])
    with pytest.raises(ValueError, match="steps must be"):
        run_experiment("sparsity", steps=0)
    with pytest.raises(SystemExit):
        main(["toy", "nope"])


# ------------------------------------------------------------------------------------------------------------------
# The composed-features lab (issue 12)
# ------------------------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

from fusedsae import toy  # noqa: E402
from fusedsae.experiments import (  # noqa: E402
    BatchedSAE,
    LabConfig,
    SAEOptions,
    best_encoder_losses,
    fold_angle,
    plus_directions,
    plus_fit,
    train_batched,
)


def quadrature_points(correlated: bool, one_hot: bool, n: int = 120) -> torch.Tensor:
    """Samples of the idealised "+" data on a midpoint grid of the amplitudes, every sign: ``[N, 2]``. Means over
    them are expectations up to the midpoint rule's O(1/n²)."""
    a = (torch.arange(n) + 0.5) / n
    if correlated or one_hot:
        a = b = (torch.arange(n * n) + 0.5) / (n * n)
    else:
        a, b = (v.flatten() for v in torch.meshgrid(a, a, indexing="ij"))
    if one_hot:
        return torch.cat(
            [torch.stack([s * a, 0 * a], 1) for s in (1, -1)] + [torch.stack([0 * a, s * a], 1) for s in (1, -1)]
        )
    return torch.cat([torch.stack([s1 * a, s2 * b], 1) for s1 in (1, -1) for s2 in (1, -1)])


def hand_built(angle: float, options: SAEOptions) -> BatchedSAE:
    """An SAE whose decoder is the "+" at ``angle`` with the tied encoder and zero biases."""
    sae = BatchedSAE(2, [0], options)
    D = plus_directions(torch.tensor([angle]))[0]
    with torch.no_grad():
        sae.W_dec.copy_(D[None])
        sae.W_enc.copy_(D.t()[None])
    return sae


@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("angle", [0.0, 45.0, 20.0])
def test_expected_l1_is_the_mean_l1_of_hand_built_dictionaries(correlated, one_hot, angle):
    x = quadrature_points(correlated, one_hot)
    with torch.no_grad():
        out = hand_built(angle, SAEOptions(objective="l1")).losses(x[None])
    assert float(out["mse"][0]) < 1e-10  # two orthonormal antipodal pairs code every sample exactly
    assert float(out["l1"][0]) == pytest.approx(toy.expected_l1(angle, correlated, float(one_hot)), abs=2e-5)


@pytest.mark.parametrize("correlated", [False, True])
def test_topk1_crossover_from_the_squared_errors_of_hand_built_dictionaries(correlated):
    mse = {}
    for angle in (0.0, 45.0):
        for one_hot in (False, True):
            with torch.no_grad():
                out = hand_built(angle, SAEOptions(objective="topk", k=1)).losses(
                    quadrature_points(correlated, one_hot)[None]
                )
            mse[angle, one_hot] = float(out["mse"][0])
    expected = {(0.0, False): 1 / 3 if correlated else 1 / 6, (45.0, False): 0.0 if correlated else 1 / 12}
    expected.update({(0.0, True): 0.0, (45.0, True): 1 / 6})
    for key, value in expected.items():
        assert mse[key] == pytest.approx(value, abs=1e-4), key
    q = toy.topk1_crossover(correlated)
    at = {a: (1 - q) * mse[a, False] + q * mse[a, True] for a in (0.0, 45.0)}
    assert at[0.0] == pytest.approx(at[45.0], abs=1e-4)


def test_plus_fit_is_basis_free_and_reads_the_angle():
    for angle in (0.0, 17.0, 45.0, 89.0):
        score, fitted = plus_fit(plus_directions(torch.tensor([angle]))[0])
        assert score == pytest.approx(1.0, abs=1e-5) and fold_angle(fitted - angle) < 0.02
    true, composed = toy.composed_basis(toy.plus_geometry())
    assert fold_angle(plus_fit(composed)[1] - plus_fit(true)[1]) == pytest.approx(45.0, abs=0.02)
    # one antipodal pair: the best "+" sits at 45° to it, every arm at cosine 1/√2; three arms: still short of 1
    assert plus_fit(true[[0, 1]])[0] == pytest.approx(0.5**0.5, abs=1e-5)
    assert 0.75 < plus_fit(true[[0, 2, 1]])[0] < 0.8
    assert fold_angle(100.0) == pytest.approx(10.0) and fold_angle(-30.0) == pytest.approx(30.0)


def test_batched_models_train_as_if_alone():
    """The loss is a sum over models, so model m's parameters after training depend on model m alone."""
    options = SAEOptions(objective="topk", k=1, steps=30, batch_size=64, resample_dead=False)
    corr, q = torch.tensor([False, True, False]), torch.tensor([0.0, 0.5, 1.0])
    W = toy.plus_geometry().expand(3, 2, 4)

    def batches(step):
        return toy.sample_composed(64, corr, q, toy.generator(0, step)) @ W.transpose(1, 2)

    together = BatchedSAE(2, [5, 6, 7], options)
    train_batched(together, batches)
    alone = BatchedSAE(2, [6], options)
    train_batched(alone, lambda step: batches(step)[1:2])
    for name, p in alone.named_parameters():
        torch.testing.assert_close(p, getattr(together, name)[1:2], rtol=1e-4, atol=1e-6)


def test_best_encoder_losses_find_soft_thresholding():
    """With the features' dictionary and one-hot data the best ReLU + L1 code is soft-thresholding at λ/2:
    the probe must reach that loss, computed here on the same samples."""
    lam = 0.2
    x = toy.ComposedToyData(one_hot_fraction=1.0).sample(0, 4096)
    sae = BatchedSAE(2, [0], SAEOptions(objective="l1", l1_coefficient=lam))
    true = toy.composed_basis(toy.plus_geometry())[0]
    found = best_encoder_losses(sae, true[None, None], x[None], steps=300)["loss"]
    a = x.abs().sum(-1)  # the one active amplitude
    optimum = torch.where(a > lam / 2, (lam / 2) ** 2 + lam * (a - lam / 2), a**2).mean()
    assert float(found[0, 0]) == pytest.approx(float(optimum), rel=0.01)
    zero_bias = lam * float(a.mean())  # the tied encoder without a bias: exact, but pays the full L1
    assert float(found[0, 0]) < 0.95 * zero_bias


def test_lab_config_and_options_errors():
    with pytest.raises(ValueError, match="objective"):
        SAEOptions(objective="jumprelu")
    with pytest.raises(ValueError, match="k must be"):
        SAEOptions(objective="topk", k=5, d_sae=4)
    with pytest.raises(ValueError, match="embedding"):
        LabConfig(embedding="cross")
    with pytest.raises(ValueError, match="width"):
        BatchedSAE(2, [0], SAEOptions(), width=torch.tensor([9]))
    assert experiments.crossover([0.0, 0.5, 1.0], [0.0, 0.25, 0.75]) == pytest.approx(0.75)
    assert math.isnan(experiments.crossover([0.0, 1.0], [0.0, 0.1]))


SMALL = LabConfig(seeds=3, steps=1000, batch_size=256, eval_size=1024, probe_steps=100, progress=False)


def by_cell(result, **match):
    """The summary row of the cell whose settings match."""
    (row,) = [r for r in result.summary if all(r[k] == v for k, v in match.items())]
    return row


def test_onehot_l1_learns_the_compositions_at_q0_and_the_features_at_q075():
    result = experiments.lab_onehot(SMALL, fractions=(0.0, 0.75), objectives=("l1",), amplitudes=("independent",))
    q0, q75 = by_cell(result, one_hot_fraction=0.0), by_cell(result, one_hot_fraction=0.75)
    assert q0["basis=composed"] >= 2 / 3 and q75["basis=true"] >= 2 / 3, (q0, q75)
    # and the objective agrees: the compositions' dictionary has the lower loss at q = 0, the features' at 0.75
    assert q0["loss_composed"] < q0["loss_true"] and q75["loss_true"] < q75["loss_composed"]
    (note,) = result.notes["crossovers"]
    assert note["analytic"] == pytest.approx(toy.l1_crossover(False))


def test_rotation_the_dictionary_turns_with_the_hidden_space():
    result = experiments.lab_rotation(SMALL, rotations=(0.0, 30.0), groups=(("l1", (0.75,)),))
    for rotation in (0.0, 30.0):
        rows = [r for r in result.rows if r["rotation"] == rotation]
        # at q = 0.75 the features win: the dictionary's "+" sits on the (rotated) features, at absolute angle
        # `rotation`, for most seeds whatever the rotation
        on_features = [r for r in rows if fold_angle(r["abs_angle"] - rotation) < 5.0]
        assert len(on_features) >= 2, rows


def test_authors_normalised_mse_stops_short_of_its_optimum():
    result = experiments.lab_authors(
        SMALL, fractions=(0.75,), variants=("standard", "normalised_mse"), amplitudes=("independent",)
    )
    standard, normalised = by_cell(result, options="standard"), by_cell(result, options="normalised_mse")
    assert standard["at_optimum"] >= 2 / 3 and standard["fvu"] < 0.02, standard
    # dividing by ‖x‖² lets the samples nearest the origin dominate: far above the hand-built dictionaries' loss
    assert normalised["at_optimum"] <= 1 / 3 and normalised["loss"] > 2 * normalised["loss_true"], normalised


def test_width_two_latents_reconstruct_but_learn_no_basis():
    result = experiments.lab_width(SMALL, widths=(2, 6), fractions=(0.75,), objectives=("topk2", "l1"))
    narrow, wide = by_cell(result, objective="topk2", width=2), by_cell(result, objective="l1", width=6)
    assert narrow["fvu"] < 0.01 and narrow["plus_score"] < 0.8, narrow  # exact with two latents: a cone, no "+"
    assert wide["basis=true"] >= 2 / 3 and wide["plus_score"] > 0.95, wide


def test_l0_too_low_mixes_correlated_features():
    result = experiments.lab_l0(dataclasses.replace(SMALL, steps=400), ks=(1, 4), objectives=("topk",))
    low, matched = by_cell(result, k=1), by_cell(result, k=4)
    assert matched["mmcs_true"] > low["mmcs_true"] + 0.1, (low, matched)
    assert low["mix_positive"] > matched["mix_positive"] + 0.05  # k = 1 latents carry their correlated partners


def test_hierarchy_children_absorb_their_parent_under_sparsity_pressure():
    result = experiments.lab_hierarchy(dataclasses.replace(SMALL, steps=400), ks=(1, 6), l1_coefficients=())
    tight, loose = by_cell(result, k=1), by_cell(result, k=6)
    assert tight["absorption"] > loose["absorption"] + 0.2, (tight, loose)
    assert tight["parent_recall_with_child"] < loose["parent_recall_with_child"] - 0.3


def test_toy_lab_command_writes_tables_and_figures(tmp_path, capsys):
    assert main(["toy", "hierarchy", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "absorption" in out and "parent_recall_with_child" in out
    record = json.loads((tmp_path / "hierarchy.json").read_text())
    assert record["experiment"] == "hierarchy" and {r["k"] for r in record["summary"]} >= {1, 6}
    assert (tmp_path / "hierarchy_summary.csv").read_text().startswith("objective,k,l1_coefficient,n,")
    assert (tmp_path / "hierarchy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as info:  # argparse's one-line error (exit 2)
        main(["toy", "onehot", "--seeds", "0", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--seeds: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_batched_activations_and_the_unit_decoder_option():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 3)
    batch = BatchedSAE(3, [1, 2], SAEOptions(objective="batchtopk", d_sae=6, k=2), k=torch.tensor([1, 3]))
    pre = batch.pre_activations(x)
    acts = batch.encode(x)
    for m, k in enumerate((1, 3)):  # BatchTopK: the k * N largest ReLU activations over the whole batch
        kept = torch.relu(pre[m]).flatten().topk(k * 50).values
        torch.testing.assert_close(acts[m].flatten().sort(descending=True).values[: k * 50], kept)
        assert int((acts[m] > 0).sum()) == int((kept > 0).sum())
    options = SAEOptions(objective="l1", unit_decoder=True, steps=20, batch_size=32)
    sae = BatchedSAE(3, [0, 1], options)
    train_batched(sae, lambda step: x[:, :32] * (1 + step % 3))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(2, 4))
