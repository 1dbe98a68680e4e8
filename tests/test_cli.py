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


# ---------------------------------------------------------------------------------------------------------------
# user mistakes: one line on stderr, a non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

QUICK = ["--steps", "2", "--batch-size", "32", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user might pass by mistake, and a real 384-wide activation cache (MiniLM's attention z width)."""
    from fusedsae.cache import CacheWriter

    root = tmp_path_factory.mktemp("bad")
    nan = torch.randn(256, 8)
    nan[17, 3] = float("nan")
    save_file({"acts": nan}, str(root / "nan.safetensors"))
    save_file({"acts": torch.randn(20, 8)}, str(root / "few.safetensors"))
    save_file({"acts": torch.randn(4, 16, 8)}, str(root / "3d.safetensors"))
    (root / "junk.txt").write_text("not activations")
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    writer = CacheWriter(root / "cache384", d_in=384, n_texts=1, source={"model": "minilm", "layer": 3}, n_heads=12)
    tokens = torch.stack([torch.zeros(40, dtype=torch.int64), torch.arange(40), torch.arange(40)], 1)
    writer.add(0, 1, torch.randn(40, 384), tokens)
    writer.finish()
    sae = fusedsae.SparseAutoencoder(d_in=64, d_sae=128, activation="topk", k=4)
    sae.save(root / "toy_sae")
    return root


def _mistakes(root: Path) -> dict[str, list[str]]:
    out = ["--out", str(root / "run")]
    data = lambda name: ["--data", str(root / name)]  # noqa: E731
    return {
        "k=0": ["train", "--k", "0", *out, *QUICK],
        "k=2.5": ["train", "--k", "2.5", *out, *QUICK],
        "k > d_sae": ["train", "--k", "600", *out, *QUICK],
        "k > given d_sae": ["train", "--k", "20", "--d-sae", "16", *out, *QUICK],
        "negative lr": ["train", "--lr", "-1", *out, *QUICK],
        "NaN lr": ["train", "--lr", "nan", *out, *QUICK],
        "batch size 0": ["train", "--batch-size", "0", *out],
        "steps 0": ["train", "--steps", "0", *out],
        "k with relu": ["train", "--activation", "relu", "--k", "8", *out, *QUICK],
        "l1 with topk": ["train", "--l1-coefficient", "2", *out, *QUICK],
        "toy option on file data": ["train", *data("few.safetensors"), "--n-features", "9", *out, *QUICK],
        "unknown toy kind": ["train", "--data", "toy:nope", *out, *QUICK],
        "NaN data": ["train", *data("nan.safetensors"), *out, *QUICK],
        "too few rows": ["train", *data("few.safetensors"), *out, "--steps", "2", "--batch-size", "64"],
        "3-D tensor": ["train", *data("3d.safetensors"), *out, *QUICK],
        "text file": ["train", *data("junk.txt"), *out, *QUICK],
        "broken safetensors": ["train", *data("junk.safetensors"), *out, *QUICK],
        "no such data": ["train", *data("missing.safetensors"), *out, *QUICK],
        "bad live spec": ["train", "--data", "live:minilm", *out, *QUICK],
        "no such device": ["train", "--device", "gpu0", *out, *QUICK],
        "toy steps 0": ["toy", "sparsity", "--steps", "0"],
        "SAE on a wider cache": ["attribute", "--sae", str(root / "toy_sae"), "--cache", str(root / "cache384")],
        "no such SAE": ["attribute", "--sae", str(root / "nothing"), "--cache", str(root / "cache384")],
        "no such command": ["trian"],
        "out is a file": ["train", "--out", str(root / "junk.txt"), *QUICK],
    }


def _one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    err = capsys.readouterr().err
    # in a real process a SystemExit with a message prints it to stderr and exits 1
    text = code if isinstance(code, str) else err
    assert code not in (0, None), argv
    assert "Traceback" not in text + err
    assert len(text.strip().splitlines()) == 1, text
    return text.strip()


def test_every_user_mistake_is_one_clear_line(bad_files, capsys):
    expected = {
        "k=0": "--k: expected a whole number >= 1",
        "k=2.5": "--k: expected a whole number >= 1, got '2.5'",
        "k > d_sae": "--k 600 is more than the SAE's 512 latents",
        "k > given d_sae": "--k 20 is more than --d-sae 16",
        "negative lr": "--lr: expected a number > 0",
        "NaN lr": "--lr: expected a number > 0",
        "batch size 0": "--batch-size: expected a whole number >= 1",
        "steps 0": "--steps: expected a whole number >= 1",
        "k with relu": "--k applies to topk and batchtopk",
        "l1 with topk": "--l1-coefficient applies to relu",
        "toy option on file data": "--n-features shape toy data only",
        "unknown toy kind": "unknown toy data 'nope'",
        "NaN data": "holds 1 NaN/Inf value(s), first in row 17",
        "too few rows": "20 activations cannot fill one batch of 64",
        "3-D tensor": "expected exactly one 2-D tensor [N, d_in], found 0 (acts [4, 16, 8])",
        "text file": "is not a .safetensors file",
        "broken safetensors": "cannot read it as safetensors",
        "no such data": "no such file or folder",
        "bad live spec": "expected live:<model>:<layer>",
        "no such device": "--device 'gpu0' is not a device",
        "toy steps 0": "--steps: expected a whole number >= 1",
        "SAE on a wider cache": "takes d_in=64 activations but the cache",
        "no such SAE": "nothing",
        "no such command": "invalid choice: 'trian'",
        "out is a file": "File exists",
    }
    for name, argv in _mistakes(bad_files).items():
        line = _one_line_error(argv, capsys)
        assert expected[name] in line, (name, line)
    assert not (bad_files / "run" / "metrics.jsonl").exists()  # no mistake trained anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU has the device")
def test_a_missing_gpu_is_one_line(tmp_path, capsys):
    line = _one_line_error(["train", "--device", "cuda", "--out", str(tmp_path), *QUICK], capsys)
    assert "sees no CUDA GPU here; use --device cpu" in line


def test_debug_shows_the_traceback(tmp_path):
    from fusedsae.cli import UsageError

    with pytest.raises(UsageError, match="--k 600 is more than"):
        main(["train", "--k", "600", "--out", str(tmp_path), "--debug", *QUICK])


def test_a_model_that_cannot_load_and_a_missing_layer_are_one_line(tmp_path, monkeypatch, capsys):
    import minilm
    from fusedsae import capture

    loaded = minilm.model()
    monkeypatch.setattr(capture, "load_model", lambda name, device="cpu": loaded)
    line = _one_line_error(["cache", "--out", str(tmp_path / "c"), "--layer", "99", "--no-progress"], capsys)
    assert "--layer 99: layer 99 is out of range: the model has 6 layers (0..5)" in line
    monkeypatch.undo()
    line = _one_line_error(["train", "--data", f"live:{tmp_path / 'no-model'}:3", "--out", str(tmp_path)], capsys)
    assert "cannot load model" in line and "use 'minilm'" in line


def test_resume_applies_safe_changes_and_refuses_others(tmp_path, capsys):
    run = ["train", "--out", str(tmp_path), "--batch-size", "32", "--no-progress", "--no-plots", "--log-every", "1"]
    assert main([*run, "--steps", "2", "--k", "6", "--d-sae", "64"]) == 0
    capsys.readouterr()
    line = _one_line_error([*run, "--resume", "--k", "3"], capsys)
    assert f"{tmp_path} was started with --k 6 but this command gives --k 3" in line
    line = _one_line_error([*run, "--resume", "--activation", "relu"], capsys)
    assert "--activation topk" in line and "--activation relu" in line
    # the same values typed again are no difference; steps and lr are applied and said
    assert main([*run, "--resume", "--k", "6", "--d-sae", "64", "--steps", "3", "--lr", "0.002"]) == 0
    out = capsys.readouterr().out
    assert "resume: --lr 0.002 (was 0.001)" in out and "resume: --steps 3 (was 2)" in out
    assert "resumed" in out
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved["steps"] == 3 and saved["lr"] == 0.002 and saved["k"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == 0.002


def test_version_help_and_a_real_process(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fusedsae {fusedsae.__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 1024)", "(default: 0.001)", "(default: 1000)", "(default: 6)", "(default: toy:sparse)"):
        assert shown in help_text, shown
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "junk.txt").write_text("x")
    for argv, code in (
        (["train", "--data", str(tmp_path / "junk.txt"), "--out", str(tmp_path)], 1),
        (["train", "--k", "0"], 2),
        # a hub id that is in no Hugging Face cache, offline (as live:gpt2:3 on a machine that never downloaded it)
        (["train", "--data", "live:fusedsae-tests/no-such-model:3", "--out", str(tmp_path)], 1),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "fusedsae", *argv], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if "Warning" not in line]
        assert len(lines) == 1 and lines[0].startswith("fusedsae train: error:"), result.stderr
