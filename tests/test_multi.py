"""Several SAEs from one pass (fusedsae.multi): trained together they end bit for bit where training each alone on
the same batches ends (weights, Adam state, counters, logs, saved folder), for a sweep of configs on one hook and
for several hooks side by side in one batch, and after a crash and resume from the newest common checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fusedsae import SparseAutoencoder, TensorSource, TrainConfig, Trainer
from fusedsae import checkpoint as ckpt
from fusedsae.formats import load_sae
from fusedsae.multi import MultiTrainer, SharedView

D, N, BATCH, STEPS = 16, 640, 32, 8
SWEEP = [
    {"activation": "topk", "k": 4, "d_sae": 64},
    {"activation": "batchtopk", "k": 3, "d_sae": 48},
    {"activation": "relu", "d_sae": 40, "l1_coefficient": 0.05},
    {"activation": "jumprelu", "d_sae": 64, "l0_coefficient": 0.01, "jumprelu_init_threshold": 0.05},
]


def data(seed, d=D):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(48, d, generator=g)
    codes = torch.rand(N, 48, generator=g) * (torch.rand(N, 48, generator=g) < 0.08)
    return codes @ features


def trainer(settings, source, run_dir, d_in=D):
    torch.manual_seed(0)  # as `fusedsae train` seeds before building the SAE
    sae = SparseAutoencoder(d_in=d_in, **settings)
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=BATCH,
        lr=3e-3,
        log_every=2,
        checkpoint_every=3,
        dead_tokens=4 * BATCH,
        run_dir=str(run_dir),
        progress=False,
        seed=5,
    )
    return Trainer(sae, source, cfg)


def log(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("tokens_per_s")
    return lines


def assert_same_run(a, b):
    """Two finished trainers (and their run folders) hold identical state."""
    for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
        assert torch.equal(p, q), name
    ta, _ = ckpt.optimizer_state(a.optimizer)
    tb, _ = ckpt.optimizer_state(b.optimizer)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired) and torch.equal(a.fire_counts, b.fire_counts)
    assert log(a.run_dir) == log(b.run_dir)
    sa, sb = load_sae(a.run_dir / "sae"), load_sae(b.run_dir / "sae")
    assert all(torch.equal(p, q) for p, q in zip(sa.state_dict().values(), sb.state_dict().values()))


def test_sweep_together_equals_each_alone(tmp_path):
    x = data(1)
    alone = [trainer(s, TensorSource(x, BATCH, seed=2), tmp_path / f"alone{i}") for i, s in enumerate(SWEEP)]
    for t in alone:
        t.train()
    source = TensorSource(x, BATCH, seed=2)
    together = [trainer(s, SharedView(source), tmp_path / f"multi{i}") for i, s in enumerate(SWEEP)]
    MultiTrainer(together, source).train()
    for a, b in zip(alone, together):
        assert_same_run(a, b)
    assert len(log(alone[0].run_dir)) == STEPS // 2


def test_transcoder_sweep_together_equals_each_alone(tmp_path):
    """Transcoders (rows [x | y], y a fixed linear map of x plus noise), with and without the skip path, from one
    pass of pair data: each ends where training it alone on the same batches ends."""
    x = data(3)
    g = torch.Generator().manual_seed(4)
    y = x @ torch.randn(D, 11, generator=g) / D**0.5 + 0.1 * torch.randn(N, 11, generator=g)
    sweep = [
        {"activation": "topk", "k": 4, "d_sae": 64, "d_out": 11},
        {"activation": "relu", "d_sae": 40, "l1_coefficient": 0.05, "d_out": 11, "skip_connection": True},
    ]
    alone = [trainer(s, TensorSource((x, y), BATCH, seed=2), tmp_path / f"alone{i}") for i, s in enumerate(sweep)]
    for t in alone:
        t.train()
    source = TensorSource((x, y), BATCH, seed=2)
    views = [SharedView(source) for _ in sweep]
    assert [(v.d_in, v.d_out) for v in views] == [(D, 11)] * 2
    together = [trainer(s, v, tmp_path / f"multi{i}") for i, (s, v) in enumerate(zip(sweep, views))]
    MultiTrainer(together, source).train()
    for a, b in zip(alone, together):
        assert b.sae.cfg.d_out == 11
        assert_same_run(a, b)
    assert together[1].sae.W_skip.abs().sum() > 0  # the skip path trained, identically (above)


def test_several_hooks_side_by_side_equal_each_alone(tmp_path):
    """A batch holding two hooks' activations side by side ([batch, 16 + 24]): each SAE takes its columns."""
    xa, xb = data(3), data(4, d=24)
    a = trainer(SWEEP[0], TensorSource(xa, BATCH, seed=2), tmp_path / "a")
    b = trainer(SWEEP[2], TensorSource(xb, BATCH, seed=2), tmp_path / "b", d_in=24)
    a.train()
    b.train()
    source = TensorSource(torch.cat([xa, xb], 1), BATCH, seed=2)
    ma = trainer(SWEEP[0], SharedView(source, (0, D)), tmp_path / "ma")
    mb = trainer(SWEEP[2], SharedView(source, (D, D + 24)), tmp_path / "mb", d_in=24)
    MultiTrainer([ma, mb], source).train()
    assert_same_run(a, ma)
    assert_same_run(b, mb)


class Crash(Exception):
    pass


class CrashingSource(TensorSource):
    def __init__(self, *args, crash_after, **kwargs):
        super().__init__(*args, **kwargs)
        self.left = crash_after

    def next_batch(self):
        if self.left == 0:
            raise Crash
        self.left -= 1
        return super().next_batch()


def test_crash_and_resume_from_the_newest_common_checkpoint(tmp_path):
    x = data(6)
    source = TensorSource(x, BATCH, seed=2)
    reference = [trainer(s, SharedView(source), tmp_path / f"ref{i}") for i, s in enumerate(SWEEP[:2])]
    MultiTrainer(reference, source).train()

    crashing = CrashingSource(x, BATCH, seed=2, crash_after=7)
    first = [trainer(s, SharedView(crashing), tmp_path / f"run{i}") for i, s in enumerate(SWEEP[:2])]
    with pytest.raises(Crash):
        MultiTrainer(first, crashing).train()
    # checkpoints at steps 3 and 6; the second SAE lost its newest one: both must restart from step 3
    shutil.rmtree(ckpt.checkpoint_root(tmp_path / "run1") / "step-000000006")
    source = TensorSource(x, BATCH, seed=2)
    second = [trainer(s, SharedView(source), tmp_path / f"run{i}") for i, s in enumerate(SWEEP[:2])]
    driver = MultiTrainer(second, source)
    assert driver.resume() == 3
    driver.train()
    for a, b in zip(reference, second):
        assert_same_run(a, b)


def test_refuses_mismatched_trainers(tmp_path):
    x = data(7)
    source = TensorSource(x, BATCH, seed=2)
    t = trainer(SWEEP[0], SharedView(source), tmp_path / "a")
    with pytest.raises(ValueError, match="SharedView"):
        MultiTrainer([trainer(SWEEP[0], TensorSource(x, BATCH), tmp_path / "b")], source)
    u = trainer(SWEEP[1], SharedView(source), tmp_path / "a")
    with pytest.raises(ValueError, match="one run folder each"):
        MultiTrainer([t, u], source)
    with pytest.raises(RuntimeError, match="through MultiTrainer.train"):
        SharedView(source).next_batch()
    with pytest.raises(ValueError, match="its own SharedView"):
        view = SharedView(source)
        MultiTrainer([trainer(SWEEP[0], view, tmp_path / "c"), trainer(SWEEP[0], view, tmp_path / "d")], source)


# ---------------------------------------------------------------------------------------------------------------
# the CLI: a sweep, and several layers from one forward pass
# ---------------------------------------------------------------------------------------------------------------

CLI_FAST = ["--batch-size", "32", "--steps", "6", "--log-every", "3", "--checkpoint-every", "3", "--no-progress"]


def _weights(folder):
    return load_sae(folder).state_dict()


def test_cli_sweep_equals_single_runs(tmp_path, capsys):
    from safetensors.torch import save_file

    from fusedsae import cli

    save_file({"acts": data(8)}, str(tmp_path / "acts.safetensors"))
    common = ["train", "--data", str(tmp_path / "acts.safetensors"), *CLI_FAST, "--no-plots"]
    assert cli.main([*common, "--d-sae", "32,48", "--k", "2,4", "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "4 SAEs from one pass" in printed
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert names == ["d32-k2", "d32-k4", "d48-k2", "d48-k4"]
    assert cli.main([*common, "--d-sae", "48", "--k", "4", "--out", str(tmp_path / "alone")]) == 0
    together, alone = _weights(tmp_path / "sweep" / "d48-k4" / "sae"), _weights(tmp_path / "alone" / "sae")
    assert all(torch.equal(together[k], alone[k]) for k in alone)
    # --resume of a finished sweep finds the common checkpoint and leaves the weights as they are
    assert cli.main([*common, "--d-sae", "32,48", "--k", "2,4", "--out", str(tmp_path / "sweep"), "--resume"]) == 0
    assert "resumed 4 SAEs at step 6" in capsys.readouterr().out
    again = _weights(tmp_path / "sweep" / "d48-k4" / "sae")
    assert all(torch.equal(again[k], alone[k]) for k in alone)


def test_cache_of_several_layers_from_one_pass_and_training_from_it(tmp_path, monkeypatch, capsys):
    import minilm
    from fusedsae import cache as K
    from fusedsae import capture as C
    from fusedsae import cli

    loaded = minilm.model()  # before the patch: minilm.model() itself calls load_model
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": loaded)
    args = ["cache", "--max-tokens", "300", "--batch-size", "4", "--no-progress"]
    assert cli.main([*args, "--layer", "2,3", "--out", str(tmp_path / "both")]) == 0
    assert cli.main([*args, "--layer", "3", "--out", str(tmp_path / "three")]) == 0
    both, three = K.ActivationCache(tmp_path / "both"), K.ActivationCache(tmp_path / "three")
    assert both.source["layer"] == [2, 3] and both.source["widths"] == [minilm.D_IN, minilm.D_IN]
    assert both.d_in == 2 * minilm.D_IN and both.rows == three.rows
    # layer 3's columns of the two-layer cache are the one-layer cache, bit for bit
    assert torch.equal(both.activations(0)[:, minilm.D_IN :], three.activations(0))
    train = ["train", "--data", str(tmp_path / "both"), "--d-sae", "64", "--k", "4", *CLI_FAST, "--no-plots"]
    assert cli.main([*train, "--out", str(tmp_path / "run")]) == 0
    for layer in (2, 3):
        cfg = json.loads((tmp_path / "run" / f"layer{layer}" / "sae" / "cfg.json").read_text())
        assert cfg["d_in"] == minilm.D_IN
        assert cfg["metadata"]["hook_spec"]["module"] == f"encoder.layer.{layer}.attention.output.dense"
        assert cfg["metadata"]["model_name"] == "minilm"
