"""The command line: `fusedsae train` (toy data by default: table, plots, SAE folder), resume, file data, `info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fusedsae
from fusedsae.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "40", "--batch-size", "256", "--no-progress", "--checkpoint-every", "20", "--log-every", "10"]


def test_train_on_toy_data_prints_table_and_writes_plots(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    for word in ("l0", "fvu", "dead_fraction", "mmcs", "tokens_per_s"):
        assert word in out, word
    for name in ("training_curves.png", "decoder_vs_truth.png", "metrics.jsonl", "summary.json", "run_config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sae = fusedsae.load(tmp_path / "sae")
    assert sae.cfg.d_in == 64 and sae.cfg.d_sae == 512 and sae.cfg.k == 6


def test_resume_continues_the_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "60", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resumed {tmp_path} at step 40/60" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60 and [r["step"] for r in rows][:4] == [10, 20, 30, 40]
    # resuming a finished run trains nothing and reports its last metrics
    assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress", "--no-plots"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_train_from_a_tensor_file_and_other_architectures(tmp_path, capsys):
    acts = torch.randn(2048, 24)
    save_file({"activations": acts}, str(tmp_path / "acts.safetensors"))
    args = [
        "train",
        "--data",
        str(tmp_path / "acts.safetensors"),
        "--activation",
        "relu",
        "--no-plots",
        "--out",
        str(tmp_path / "run"),
        *FAST,
    ]
    assert main(args) == 0
    assert fusedsae.load(tmp_path / "run" / "sae").cfg.d_sae == 8 * 24
    for data in ("toy:superposition", "toy:composed"):
        assert main(["train", "--data", data, "--out", str(tmp_path / data[4:]), "--no-plots", *FAST]) == 0
    with pytest.raises(SystemExit, match="no such file"):
        main(["train", "--data", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x"), *FAST])
    with pytest.raises(SystemExit, match="unknown toy data"):
        main(["train", "--data", "toy:nope", "--out", str(tmp_path / "x"), *FAST])


def test_info_and_module_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run(
        [sys.executable, "-m", "fusedsae", "info"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fusedsae " + fusedsae.__version__ in result.stdout
    for name in ("reference", "triton", "cuda"):
        assert name in result.stdout
