"""Experiment tracking: `--log wandb tensorboard` write the metrics of metrics.jsonl under the same names, with the
run config, without a network; the Trainer's callback protocol (call with each metrics dict, close once)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import fusedsae
from fusedsae import tracking
from fusedsae.cli import main


def _jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scalar_keys(rows: list[dict]) -> set[str]:
    return {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks, each record chunk has a
    7-byte header of CRC32, little-endian length and chunk type full/first/middle/last = 1/2/3/4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, block, parts = 7, 32768, b""  # the file starts with a 7-byte ":W&B" header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def test_log_wandb_and_tensorboard_write_the_jsonl_metrics(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc, no W&B settings of the machine's user
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert tracking.wandb_mode() == "offline"  # no account: never a login prompt
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--steps", "6", "--batch-size", "64", "--log-every", "2", "--no-progress"]
    assert main([*argv, "--no-plots", "--log", "jsonl", "tensorboard", "wandb"]) == 0
    out = capsys.readouterr().out
    assert f"tensorboard: {run / 'tensorboard'}" in out and "wandb: offline run in" in out and "wandb sync" in out
    rows = _jsonl(run)
    keys = _scalar_keys(rows)
    assert {"loss", "fvu", "l0", "dead_fraction", "tokens", "lr", "mmcs"} <= keys
    settings = json.loads((run / "run_config.json").read_text())

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        # event files hold float32
        torch.testing.assert_close(
            torch.tensor([v for _, v in logged]), torch.tensor([float(v) for _, v in expected], dtype=torch.float32)
        )
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in config_text.splitlines())) == settings

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for logged, row in zip(history, rows):
        assert {k: v for k, v in logged.items() if not k.startswith("_")} == {
            k: pytest.approx(float(row[k]), rel=1e-12) for k in keys if k in row
        }
    assert {k: v for k, v in config.items() if k != "_wandb"} == settings


def test_trainer_callbacks_get_every_logged_line_and_are_closed_once():
    seen: list[dict] = []

    class Recorder:
        closed = 0

        def __call__(self, metrics):
            seen.append(dict(metrics))

        def close(self):
            Recorder.closed += 1

    plain: list[int] = []
    data = fusedsae.toy.SparseFeatureData(d_in=8, n_features=16, mean_active=2.0)
    sae = fusedsae.SparseAutoencoder(d_in=8, d_sae=32, activation="topk", k=2)
    cfg = fusedsae.TrainConfig(steps=5, batch_size=32, log_every=2, progress=False)
    metrics = fusedsae.Trainer(sae, data, cfg, callbacks=[Recorder(), lambda m: plain.append(m["step"])]).train()
    assert [m["step"] for m in seen] == plain == [2, 4, 5]
    assert seen[-1] == metrics and Recorder.closed == 1


def test_a_missing_tracker_library_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(
        SystemExit, match=r"--log: wandb logging needs the wandb package: pip install 'fusedsae\[wandb\]'"
    ):
        main(["train", "--out", str(tmp_path), "--steps", "1", "--batch-size", "8", "--log", "wandb", "--no-progress"])


def test_a_resumed_run_continues_its_wandb_run_and_trims_tensorboard(tmp_path, monkeypatch, capsys):
    """Stand-ins for wandb and TensorBoard's writer record what the CLI asks of them, so this runs without either
    library: the resumed run passes the first run's id with resume="allow" (one W&B run, not two) and asks
    TensorBoard to hide the events past the checkpoint it resumed from."""
    import sys
    import types

    inits: list[dict] = []
    writers: list[dict] = []

    class Run:
        dir = str(tmp_path / "wandb" / "run" / "files")

        def log(self, metrics, step):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        inits.append(kwargs)
        return Run()

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            writers.append({"purge_step": purge_step})

        def add_text(self, *args):
            pass

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = ["train", "--out", str(tmp_path), "--batch-size", "64", "--no-progress", "--no-plots"]
    run += ["--checkpoint-every", "4", "--log-every", "2", "--log", "jsonl", "wandb", "tensorboard"]
    assert main([*run, "--steps", "4"]) == 0
    assert main([*run, "--steps", "6", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    run_id = json.loads((tmp_path / "run_config.json").read_text())["run_id"]
    assert [(i["id"], i["resume"]) for i in inits] == [(run_id, "allow")] * 2
    assert [w["purge_step"] for w in writers] == [None, 5]
