"""Toy experiments (`fusedsae toy`): the findings the README states hold when the SAEs are trained here, the
learned-basis rule, the command's outputs and its errors."""

from __future__ import annotations

import json

import pytest

from fusedsae import experiments
from fusedsae.cli import main
from fusedsae.experiments import learned_basis, run_experiment


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
