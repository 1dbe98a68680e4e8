"""Activation cache: shards + manifest hold exactly the captured tokens; an interrupted write resumes to the same
bytes; truncated or corrupt shards give errors naming the shard; shuffled streaming is deterministic, resumable and
rank-sharded; ``fusedsae train --data <cache dir>`` trains from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import minilm
from fusedsae import cache as K
from fusedsae import capture as C
from fusedsae import cli

N_TEXTS = 40
BATCH = 8  # texts per forward pass
SHARD_TOKENS = 300  # about every second batch ends a shard: 5 shards


def _write(path: Path, **kwargs) -> K.ActivationCache:
    model, tok = minilm.model()
    return K.write_cache(
        path,
        model,
        tok,
        list(minilm.texts(N_TEXTS)),
        minilm.hooks().z,
        n_heads=minilm.N_HEADS,
        source={"model": "minilm", "layer": minilm.LAYER},
        batch_size=BATCH,
        shard_tokens=SHARD_TOKENS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory) -> K.ActivationCache:
    return _write(tmp_path_factory.mktemp("cache") / "ref")


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_shards_and_manifest_hold_the_captured_tokens(reference_cache):
    cache = reference_cache
    model, tok = minilm.model()
    direct = list(C.iter_capture(model, tok, list(minilm.texts(N_TEXTS)), {"z": minilm.hooks().z}, BATCH))
    z = torch.cat([b.acts["z"] for _, _, b in direct])
    meta = torch.cat([torch.stack([b.text_index, b.position, b.token_ids], 1) for _, _, b in direct])
    assert cache.n_shards > 2 and cache.rows == z.shape[0] and cache.d_in == minilm.D_IN
    assert cache.n_heads == minilm.N_HEADS and cache.source["layer"] == minilm.LAYER
    stored = torch.cat([cache.activations(i) for i in range(cache.n_shards)])
    assert torch.equal(stored, z)
    assert torch.equal(torch.cat([cache.tokens(i) for i in range(cache.n_shards)]), meta)
    ends = 0
    for i, shard in enumerate(cache.shards):  # each shard holds whole texts, in order
        assert shard["first_text"] == ends
        texts = cache.tokens(i)[:, 0]
        assert int(texts.min()) == shard["first_text"] and int(texts.max()) == shard["end_text"] - 1
        ends = shard["end_text"]
    assert ends == N_TEXTS
    manifest = json.loads((cache.path / K.MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == cache.rows
    cache.verify()


def test_bfloat16_cache_stores_the_rounded_activations(tmp_path, reference_cache):
    cache = _write(tmp_path / "bf16", dtype="bfloat16")
    assert cache.dtype == "bfloat16"
    for i in range(cache.n_shards):
        got = cache.activations(i)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, reference_cache.activations(i).to(torch.bfloat16))


def _crash_on_call(monkeypatch, name: str, at: int, partial: bool):
    """Makes ``fusedsae.cache.<name>`` raise on its ``at``-th call, after writing half its bytes if ``partial``."""
    real = getattr(K, name)
    calls = {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == at:
            if partial:
                path, data = args
                (path.parent / f".{path.name}.tmp-{12345}").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash")
        return real(*args)

    monkeypatch.setattr(K, name, crashing)


@pytest.mark.parametrize(
    "where",
    # atomic_write's 5th call writes shard 1's activations (1: empty manifest, 2-4: shard 0's two files + manifest)
    [("atomic_write", 5, True), ("_write_manifest", 4, False)],
    ids=["mid-shard-file", "before-manifest-update"],
)
def test_interrupted_write_resumes_to_the_same_bytes(tmp_path, monkeypatch, reference_cache, where):
    name, at, partial = where
    path = tmp_path / "cache"
    with monkeypatch.context() as patch:
        _crash_on_call(patch, name, at, partial)
        with pytest.raises(KeyboardInterrupt):
            _write(path)
    with pytest.raises(K.CacheError, match="incomplete"):
        K.ActivationCache(path)
    partial_cache = K.ActivationCache(path, allow_incomplete=True)
    assert 0 < partial_cache.n_shards < reference_cache.n_shards
    resumed = _write(path)
    assert resumed.manifest["complete"]
    assert _files(path) == _files(reference_cache.path)


def test_truncated_or_corrupt_shards_are_named_and_repaired(tmp_path, reference_cache):
    path = tmp_path / "cache"
    shutil.copytree(reference_cache.path, path)
    target = path / "shard-000001.acts.npy"
    original = target.read_bytes()
    target.write_bytes(original[:-100])
    with pytest.raises(K.CacheError, match=r"shard shard-000001 .*truncated"):
        K.ActivationCache(path)
    with pytest.raises(K.CacheError, match=r"shard-000001"):
        K.CacheSource(path, batch_size=16)
    # same size, one flipped byte in the data: only the hash sees it
    flipped = bytearray(original)
    flipped[-7] ^= 0xFF
    target.write_bytes(bytes(flipped))
    opened = K.ActivationCache(path)  # opening checks sizes only
    with pytest.raises(K.CacheError, match=r"shard-000001 .*SHA-256"):
        K.ActivationCache(path, verify=True)
    opened.activations(0)
    with pytest.raises(K.CacheError, match=r"shard-000001 .*SHA-256"):  # the first read of a shard hashes it
        opened.activations(1)
    # a damaged header: the size is right but numpy cannot read it (seen when the hash was already checked)
    target.write_bytes(b"garbage!" + original[8:])
    opened.verified.add(target.name)
    with pytest.raises(K.CacheError, match=r"shard-000001 .*not a readable \.npy"):
        opened.activations(1)
    # re-running the capture re-verifies, drops shard 1 and what follows, and rewrites them
    _write(path).verify()
    assert _files(path) == _files(reference_cache.path)


def test_other_settings_are_refused(tmp_path, reference_cache):
    path = tmp_path / "cache"
    shutil.copytree(reference_cache.path, path)
    with pytest.raises(K.CacheError, match=r"other settings.*dtype"):
        _write(path, dtype="float16")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # never deletes a folder that is not a cache
        with pytest.raises(K.CacheError, match="not an activation cache"):
            _write(tmp_path / "other", overwrite=overwrite)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert _write(path, dtype="float16", overwrite=True).dtype == "float16"
    with pytest.raises(K.CacheError, match=r"no manifest\.json"):
        K.ActivationCache(tmp_path / "other")


def _batches(source, n):
    return [source.next_batch() for _ in range(n)]


def test_shuffled_stream_is_deterministic_resumable_and_sharded(reference_cache):
    cache = reference_cache
    rows = torch.cat([cache.activations(i) for i in range(cache.n_shards)])
    batch, per_epoch = 64, cache.rows // 64

    def source(**kw):
        return K.CacheSource(cache, batch, buffer_tokens=kw.pop("buffer", 500), **kw)

    first = _batches(source(seed=3), per_epoch + 5)
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(source(seed=3), per_epoch + 5)))
    assert not torch.equal(first[0], _batches(source(seed=4), 1)[0])
    # one epoch visits distinct rows; shuffle=False streams the cache in order
    epoch = torch.cat(first[:per_epoch])
    assert torch.unique(epoch, dim=0).shape[0] == epoch.shape[0] == per_epoch * batch
    assert (epoch[:, None, :8] == rows[None, :, :8]).all(-1).any(1).all()  # every row is a cached row
    assert torch.equal(torch.cat(_batches(source(shuffle=False), 3)), rows[: 3 * batch])
    assert not torch.equal(torch.cat(first[per_epoch:]), torch.cat(first[:5]))  # the next epoch reshuffles
    # a source restored from a state (through JSON) continues exactly
    src = source(seed=3)
    _batches(src, per_epoch - 2)
    state = json.loads(json.dumps(src.state_dict()))
    restored = source(seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_batches(restored, 7), first[per_epoch - 2 : per_epoch + 5]))
    # two ranks split each global batch of 2 x 32 rows of the one-rank stream
    ranks = [K.CacheSource(cache, batch // 2, buffer_tokens=500, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for i in range(per_epoch + 3):
        assert torch.equal(torch.cat([ranks[0].next_batch(), ranks[1].next_batch()]), first[i])


def test_live_source_matches_the_capture_and_resumes():
    model, tok = minilm.model()
    texts = list(minilm.texts(24))
    hook = minilm.hooks().z
    captured = torch.cat([b.acts["z"] for _, _, b in C.iter_capture(model, tok, texts, {"z": hook}, 8)])
    ordered = K.LiveSource(model, tok, texts, hook, 100, capture_batch_size=8, buffer_texts=8, shuffle=False)
    assert ordered.rows == captured.shape[0] and ordered.d_in == minilm.D_IN
    assert torch.equal(torch.cat(_batches(ordered, 4)), captured[:400])
    live = K.LiveSource(model, tok, texts, hook, 100, capture_batch_size=8, buffer_texts=8, seed=1)
    head = _batches(live, 3)
    state = live.state_dict()
    tail = _batches(live, 2)
    again = K.LiveSource(model, tok, texts, hook, 100, capture_batch_size=8, buffer_texts=8, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_batches(again, 2), tail))
    assert (torch.cat(head)[:, None, :8] == captured[None, :, :8]).all(-1).any(1).all()


def test_train_from_a_cache_folder(tmp_path, reference_cache, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(reference_cache.path), "--d-sae", "96", "--k", "4", "--batch-size", "64"]
    args += ["--out", str(out), "--no-plots", "--no-progress", "--checkpoint-every", "10", "--log-every", "10"]
    assert cli.main([*args, "--steps", "20"]) == 0
    assert "explained_variance" in capsys.readouterr().out
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == minilm.D_IN
    assert cfg["metadata"]["fusedsae"]["n_heads"] == minilm.N_HEADS
    assert cfg["metadata"]["hook_name"] == minilm.hooks().z.module
    assert cfg["metadata"]["model_name"] == "minilm"
    assert cli.main([*args, "--steps", "30", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"incomplete|no manifest"):
        cli.main(["train", "--data", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "x")])


def test_cache_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": minilm.model())
    out = tmp_path / "c"
    args = ["cache", "--out", str(out), "--layer", "3", "--max-tokens", "400", "--shard-tokens", "150"]
    assert cli.main([*args, "--batch-size", "4", "--no-progress"]) == 0
    assert "12 heads" in capsys.readouterr().out
    cache = K.ActivationCache(out, verify=True)
    assert 300 < cache.rows <= 400 and cache.n_shards >= 2
    assert cache.source["model"] == "minilm" and cache.source["layer"] == 3


def test_train_from_live_capture(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": minilm.model())
    texts = list(minilm.texts(16))
    monkeypatch.setattr(C, "offline_texts", lambda source="pydoc": texts)
    out = tmp_path / "live"
    args = ["train", "--data", "live:minilm:3", "--d-sae", "96", "--k", "4", "--batch-size", "64", "--steps", "6"]
    assert cli.main([*args, "--out", str(out), "--no-plots", "--no-progress"]) == 0
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["fusedsae"]["n_heads"] == minilm.N_HEADS
    assert cfg["metadata"]["hook_name"] == minilm.hooks().z.module and cfg["metadata"]["model_name"] == "minilm"
    with pytest.raises(SystemExit, match="live:<model>:<layer>"):
        cli.main(["train", "--data", "live:minilm", "--out", str(tmp_path / "x")])
