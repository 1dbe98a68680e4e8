"""Transcoder data (issue 13 item 2): ``(x, y)`` pairs become rows ``[x | y]`` from tensors, iterables, a pair of
tensor files, two hooks of one MiniLM forward pass, a pair cache and live capture; each source records ``d_in`` and
``d_out``; a plain SAE given pairs, a transcoder given plain rows and other mistakes are one clear line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import minilm
from fusedsae import SparseAutoencoder, cli
from fusedsae import cache as K
from fusedsae import capture as C
from fusedsae.data import (
    DataError,
    IterableSource,
    TensorSource,
    as_source,
    check_widths,
    from_spec,
    join_pair,
    parse_live_spec,
    split_pair,
)
from fusedsae.formats import load_sae

D_IN, D_OUT = 6, 5


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)


def test_join_and_split_are_inverse_views():
    x, y = _pairs(7)
    rows = join_pair(x, y)
    assert rows.shape == (7, D_IN + D_OUT)
    x2, y2 = split_pair(rows, D_IN)
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert x2.data_ptr() == rows.data_ptr()  # views: the trainer's split copies nothing
    with pytest.raises(DataError, match="x has 7 rows but y has 6; a transcoder pair needs one y row per x row"):
        join_pair(x, y[:6])
    with pytest.raises(DataError, match=r"y is a torch.int64 tensor of shape \(7, 5\)"):
        join_pair(x, y.long())
    with pytest.raises(DataError, match=r"x is a torch.float32 tensor of shape \(7, 2, 3\)"):
        join_pair(x.view(7, 2, 3), y)


def test_a_tensor_pair_is_shuffled_as_joined_rows_and_resumes():
    """The rows stay paired through the shuffle, every epoch, and across a resume (the permutation is the same one
    a plain source of the joined rows draws)."""
    x, y = _pairs(50)
    source = as_source((x, y), 8, seed=3)
    assert isinstance(source, TensorSource) and (source.d_in, source.d_out) == (D_IN, D_OUT)
    info = source.describe()
    assert (info["kind"], info["n"], info["d_in"], info["d_out"]) == ("tensor", 50, D_IN, D_OUT)
    plain = TensorSource(torch.cat([x, y], 1), 8, seed=3)
    assert plain.d_out is None and plain.d_in == D_IN + D_OUT
    batches = [source.next_batch() for _ in range(9)]  # 6 batches per epoch: crosses into the second
    for batch in batches:
        bx, by = split_pair(batch, D_IN)
        rows = (bx[:, None, :] == x[None]).all(-1).int().argmax(1)  # which row of x each batch row is
        assert torch.equal(by, y[rows])
    assert all(torch.equal(a, plain.next_batch()) for a in batches)
    again = as_source((x, y), 8, seed=3)
    again.load_state_dict(json.loads(json.dumps(_state_after(as_source((x, y), 8, seed=3), 4))))
    assert all(torch.equal(again.next_batch(), b) for b in batches[4:])
    joined = TensorSource(torch.cat([x, y], 1), 8, d_out=D_OUT)  # rows joined already, widths given
    assert (joined.d_in, joined.d_out) == (D_IN, D_OUT)
    with pytest.raises(DataError, match="x has 50 rows but y has 49"):
        as_source((x, y[:49]), 8)
    with pytest.raises(DataError, match="d_out=11 does not split rows of width 11"):
        TensorSource(torch.cat([x, y], 1), 8, d_out=D_IN + D_OUT)


def _state_after(source, n):
    for _ in range(n):
        source.next_batch()
    return source.state_dict()


def test_an_iterable_of_pairs_and_a_dataloader_over_x_and_y():
    items = [_pairs(n, seed=n) for n in (5, 11, 3, 16)]  # 35 rows: two batches of 16
    source = IterableSource(items, 16)
    assert (source.d_in, source.d_out) == (D_IN, D_OUT) and source.describe()["d_out"] == D_OUT
    rows = torch.cat([join_pair(x, y) for x, y in items])
    assert torch.equal(source.next_batch(), rows[:16]) and torch.equal(source.next_batch(), rows[16:32])
    x, y = _pairs(40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # yields [x, y]
    source = as_source(loader, 16)
    assert isinstance(source, IterableSource) and source.d_out == D_OUT
    assert torch.equal(source.next_batch(), join_pair(x[:16], y[:16]))
    with pytest.raises(DataError, match=r"item 1 .* is a single tensor but the first item was \(x, y\) pairs"):
        IterableSource([_pairs(4), torch.randn(4, D_IN + D_OUT)], 8).next_batch()
    with pytest.raises(DataError, match=r"item 1 .* is an \(x, y\) pair but the first item was single tensors"):
        IterableSource([torch.randn(4, D_IN), _pairs(4)], 8).next_batch()
    with pytest.raises(DataError, match="item 1 .* has d_in=6, d_out=3 but the first one had d_in=6, d_out=5"):
        IterableSource([_pairs(4), (torch.randn(4, D_IN), torch.randn(4, 3))], 8).next_batch()
    with pytest.raises(DataError, match="item 0 .*: x has 4 rows but y has 3"):
        IterableSource([(torch.randn(4, D_IN), torch.randn(3, D_OUT))], 8)


def test_a_pair_of_tensor_files(tmp_path):
    x, y = _pairs(40)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    save_file({"y": y}, str(tmp_path / "y.safetensors"))
    save_file({"y": y[:30]}, str(tmp_path / "short.safetensors"))
    spec = f"{tmp_path / 'x.safetensors'},{tmp_path / 'y.safetensors'}"
    source = from_spec(spec, 10, seed=1)
    assert (source.d_in, source.d_out) == (D_IN, D_OUT)
    assert torch.equal(source.activations, join_pair(x, y))
    with pytest.raises(DataError, match="x has 40 rows but y has 30"):
        from_spec(f"{tmp_path / 'x.safetensors'},{tmp_path / 'short.safetensors'}", 10)
    with pytest.raises(DataError, match="no such file .*nope.safetensors"):
        from_spec(f"{tmp_path / 'x.safetensors'},{tmp_path / 'nope.safetensors'}", 10)
    with pytest.raises(DataError, match="is a tensor file: a target hook applies to data captured from a model"):
        from_spec(str(tmp_path / "x.safetensors"), 10, target_hook="encoder.layer.3.output.dense")


def test_check_widths_names_the_mismatch_in_one_line():
    pairs, plain = as_source(_pairs(20), 4), as_source(torch.randn(20, D_IN), 4)
    check_widths(pairs, D_IN, D_OUT)
    check_widths(plain, D_IN, None)
    check_widths(as_source(torch.randn(20, D_IN + D_OUT), 4), D_IN, D_OUT)  # rows joined by hand: width checked
    with pytest.raises(DataError, match=r"holds transcoder \(x, y\) pairs \(d_in=6, d_out=5\) but the SAE is a plain"):
        check_widths(pairs, D_IN, None)
    with pytest.raises(
        DataError, match=r"has \(x, y\) pairs d_in=6, d_out=5 but the SAE expects \(x, y\) pairs d_in=6, d_out=4"
    ):
        check_widths(pairs, D_IN, 4)
    with pytest.raises(DataError, match="the data has d_in=6 but the SAE expects d_in=7"):
        check_widths(plain, 7, None)
    with pytest.raises(
        DataError,
        match=r"rows of width 6 but the transcoder trains on \[x \| y\] rows of width d_in \+ d_out = 6 \+ 5 = 11",
    ):
        check_widths(plain, D_IN, D_OUT)

    class Captured:  # a capture of one hook (as a cache's or a live source's describe() says) at the right width
        d_in = D_IN + D_OUT

        def describe(self):
            return {"kind": "cache", "path": "c", "hook": {"module": "m", "io": "input"}}

    with pytest.raises(DataError, match=r"the data \(c\) holds plain activations of one tensor \(d_in=11\) but"):
        check_widths(Captured(), D_IN, D_OUT)
    check_widths(Captured(), D_IN + D_OUT, None)


def test_hook_and_live_spec_parsing():
    assert C.HookSpec.parse("a.b") == C.HookSpec("a.b", "input")
    assert C.HookSpec.parse("a.b", io="output") == C.HookSpec("a.b", "output")
    assert C.HookSpec.parse("a.b:input", io="output") == C.HookSpec("a.b", "input")
    assert C.HookSpec.parse(C.HookSpec("a.b", "output").text()) == C.HookSpec("a.b", "output")
    with pytest.raises(ValueError, match="ends in 'outptu'"):
        C.HookSpec.parse("a.b:outptu")
    assert parse_live_spec("live:minilm:3") == ("minilm", [3], None)
    assert parse_live_spec("live:minilm:1,3") == ("minilm", [1, 3], None)
    name, layers, hook = parse_live_spec("live:minilm:encoder.layer.3.intermediate")
    assert (name, layers, hook) == ("minilm", None, C.HookSpec("encoder.layer.3.intermediate", "input"))
    assert parse_live_spec("live:m:x.y:output")[2] == C.HookSpec("x.y", "output")
    with pytest.raises(DataError, match="expected live:<model>:<layer>"):
        parse_live_spec("live:minilm")
    with pytest.raises(DataError, match="ends in 'sideways'"):
        parse_live_spec("live:minilm:x.y:sideways")


# ---------------------------------------------------------------------------------------------------------------
# MiniLM layer 3's MLP: input and output of one forward pass
# ---------------------------------------------------------------------------------------------------------------


def _mlp():
    return minilm.mlp_hooks()


def test_two_hooks_of_one_pass_are_the_mlp_input_and_its_output():
    """The pairs are the same tokens: y is the MLP (intermediate dense + GELU, then output.dense) applied to x, row by
    row, and x is the attention block's output; padding is removed from both alike."""
    model, tok = minilm.model()
    hooks = _mlp()
    assert hooks.input == C.HookSpec("encoder.layer.3.intermediate", "input")
    assert hooks.output == C.HookSpec("encoder.layer.3.output.dense", "output")
    inputs = C.tokenize(tok, list(minilm.texts(6)), 128)
    batch = C.capture_pairs(model, inputs, hooks.input, hooks.output)
    x, y = batch.acts["x"], batch.acts["y"]
    assert batch.n_tokens == int(inputs["attention_mask"].sum()) and x.shape == y.shape == (batch.n_tokens, 384)
    assert torch.equal(batch.acts["pairs"], torch.cat([x, y], 1))
    layer = model.encoder.layer[minilm.LAYER]
    with torch.no_grad():
        expected = layer.output.dense(layer.intermediate(x))
    torch.testing.assert_close(y, expected)
    attention = C.capture(model, inputs, {"a": C.HookSpec(f"encoder.layer.{minilm.LAYER}.attention", "output")})
    assert torch.equal(attention.acts["a"], x)
    with pytest.raises(ValueError, match="layer 6 is out of range"):
        C.mlp_hooks(model, 6)


def test_a_pair_cache_round_trips_and_is_refused_for_a_plain_sae(tmp_path):
    model, tok = minilm.model()
    texts = list(minilm.texts(8))
    hooks = _mlp()
    cache = K.write_cache(
        tmp_path / "pairs", model, tok, texts, hooks.input, batch_size=4, shard_tokens=60, target_hook=hooks.output
    )
    assert (cache.d_in, cache.d_out, cache.width) == (384, 384, 768) and cache.n_shards >= 2
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["version"] == K.PAIR_CACHE_VERSION and (manifest["d_in"], manifest["d_out"]) == (384, 384)
    assert manifest["source"]["target_hook"] == hooks.output.to_dict()
    captured = torch.cat(
        [
            b.acts["pairs"]
            for b in (
                C.capture_pairs(model, C.tokenize(tok, texts[i : i + 4], 128), hooks.input, hooks.output)
                for i in (0, 4)
            )
        ]
    )
    stored = torch.cat([cache.activations(i) for i in range(cache.n_shards)])
    assert torch.equal(stored, captured)
    source = from_spec(str(tmp_path / "pairs"), 64, seed=0)
    assert (source.d_in, source.d_out) == (384, 384) and source.next_batch().shape == (64, 768)
    assert source.describe()["d_out"] == 384
    from_spec(str(tmp_path / "pairs"), 64, target_hook=hooks.output.text())  # the cache's own target: accepted
    with pytest.raises(DataError, match="the cache's target is encoder.layer.3.output.dense:output, not x.y:output"):
        from_spec(str(tmp_path / "pairs"), 64, target_hook="x.y")
    with pytest.raises(DataError, match=r"holds transcoder \(x, y\) pairs \(d_in=384, d_out=384\) but the SAE"):
        check_widths(source, 384, None)
    # a plain capture into the pair cache's folder is refused, not mixed in
    with pytest.raises(K.CacheError, match="d_out: folder has 384, asked for None"):
        K.write_cache(tmp_path / "pairs", model, tok, texts, hooks.input, batch_size=4, shard_tokens=60)
    # a plain cache for a transcoder
    plain = K.write_cache(tmp_path / "plain", model, tok, texts[:2], hooks.input, batch_size=4)
    assert plain.d_out is None and json.loads((tmp_path / "plain" / "manifest.json").read_text())["version"] == 1
    with pytest.raises(DataError, match="the cache holds plain activations, not \\(x, y\\) pairs"):
        from_spec(str(tmp_path / "plain"), 16, target_hook=hooks.output.text())
    with pytest.raises(DataError, match=r"holds plain activations of one tensor \(d_in=384\) but the SAE is a"):
        check_widths(K.CacheSource(plain, 16), 192, 192)


def test_a_damaged_pair_manifest_is_named(tmp_path):
    model, tok = minilm.model()
    hooks = _mlp()
    K.write_cache(tmp_path / "c", model, tok, list(minilm.texts(2)), hooks.input, target_hook=hooks.output)
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["d_out"], manifest["manifest_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(K.CacheError, match="field 'd_out' must be a positive integer in a pair cache"):
        K.ActivationCache(tmp_path / "c")


def test_live_pairs_match_the_capture():
    model, tok = minilm.model()
    texts = list(minilm.texts(8))
    hooks = _mlp()
    live = K.LiveSource(
        model, tok, texts, hooks.input, 50, capture_batch_size=4, shuffle=False, target_hook=hooks.output
    )
    assert (live.d_in, live.d_out) == (384, 384)
    info = live.describe()
    assert info["target_hook"] == hooks.output.to_dict() and info["hook"] == hooks.input.to_dict()
    first = C.capture_pairs(model, C.tokenize(tok, texts[:4], 128), hooks.input, hooks.output).acts["pairs"]
    assert torch.equal(live.next_batch(), first[:50])
    with pytest.raises(ValueError, match="a transcoder reads one hook and reconstructs another; got 2 input hooks"):
        K.LiveSource(model, tok, texts, [hooks.input, hooks.input], 50, target_hook=hooks.output)


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


def test_cache_command_writes_pairs(tmp_path, monkeypatch, capsys):
    loaded = minilm.model()  # loaded before the patch: minilm.model() itself calls capture.load_model
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": loaded)
    out = tmp_path / "c"
    args = ["cache", "--out", str(out), "--hook", "encoder.layer.3.intermediate", "--max-tokens", "200"]
    assert cli.main([*args, "--target-hook", "encoder.layer.3.output.dense", "--no-progress"]) == 0
    assert "d_in=384 + d_out=384 (pairs [x | y])" in capsys.readouterr().out
    cache = K.ActivationCache(out, verify=True)
    assert cache.d_out == 384 and cache.source["target_hook"]["module"] == "encoder.layer.3.output.dense"
    with pytest.raises(SystemExit, match="--target-hook: a transcoder reads one tensor; --layer"):
        cli.main(["cache", "--out", str(tmp_path / "d"), "--layer", "1,3", "--target-hook", "x.y"])
    SparseAutoencoder(d_in=384, d_sae=16, activation="topk", k=2).save(tmp_path / "sae")
    with pytest.raises(SystemExit, match=r"holds transcoder \(x, y\) pairs; attribute reads a one-hook cache"):
        cli.main(["attribute", "--sae", str(tmp_path / "sae"), "--cache", str(out)])


def test_train_flags_refuse_what_cannot_work(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--steps", "1"]
    with pytest.raises(SystemExit, match="--target-hook applies to data captured from a model"):
        cli.main(["train", "--target-hook", "x.y", *out])
    with pytest.raises(SystemExit, match="expected live:<model>:<layer>"):
        cli.main(["train", "--data", "live:minilm", *out])


def test_a_sweep_of_skip_transcoders_from_one_pass_equals_each_alone(tmp_path, capsys):
    """`--d-sae 8,16 --k 2,3` on (x, y) pair files trains four skip-transcoders from one pass; each saved folder
    equals the one trained alone with its settings, and a --resume of the sweep leaves it so."""
    x, y = _pairs(256, seed=3)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    save_file({"y": y + x[:, :D_OUT]}, str(tmp_path / "y.safetensors"))
    pair = f"{tmp_path / 'x.safetensors'},{tmp_path / 'y.safetensors'}"
    common = ["train", "--data", pair, "--batch-size", "32", "--steps", "6", "--log-every", "3", "--skip-connection"]
    common += ["--checkpoint-every", "3", "--no-progress", "--no-plots"]
    assert cli.main([*common, "--d-sae", "8,16", "--k", "2,3", "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "4 SAEs from one pass" in printed and "topk skip-transcoder, d_in=6, d_out=5, d_sae=16, k=3" in printed
    assert cli.main([*common, "--d-sae", "16", "--k", "3", "--out", str(tmp_path / "alone")]) == 0
    together, alone = load_sae(tmp_path / "sweep" / "d16-k3" / "sae"), load_sae(tmp_path / "alone" / "sae")
    assert (together.cfg.d_in, together.cfg.d_out, together.cfg.skip_connection) == (D_IN, D_OUT, True)
    a, b = together.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "sweep" / "run_config.json").read_text())["widths"] == {"d_in": 6, "d_out": 5}
    # --resume of the finished sweep restores all four from the common checkpoint and leaves the weights as they are
    capsys.readouterr()
    assert cli.main([*common, "--d-sae", "8,16", "--k", "2,3", "--out", str(tmp_path / "sweep"), "--resume"]) == 0
    assert "resumed 4 SAEs at step 6" in capsys.readouterr().out
    again = load_sae(tmp_path / "sweep" / "d16-k3" / "sae").state_dict()
    assert all(torch.equal(again[k], b[k]) for k in b)


# ---------------------------------------------------------------------------------------------------------------
# spliced-in evaluation: x read at one hook, y replaced at another, in one pass
# ---------------------------------------------------------------------------------------------------------------


def test_splice_pair_replaces_y_from_x_of_the_same_pass():
    """Replacing the MLP's output by the MLP applied to the kept input changes nothing; replacing it by zeros changes
    the hidden states; and a target that runs before the input is refused in one line."""
    from fusedsae import evals as E

    model, tok = minilm.model()
    hooks = _mlp()
    inputs = C.tokenize(tok, list(minilm.texts(3)), 128)
    mask = inputs["attention_mask"].bool()
    layer = model.encoder.layer[minilm.LAYER]
    with torch.no_grad():
        clean = model(**inputs).last_hidden_state
        seen = []

        def exact(x, y):
            seen.append((x.shape, y.shape))
            # the MLP by its weights: calling the hooked modules here would fire the splice's own hooks again
            hidden = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            return F.linear(hidden, layer.output.dense.weight, layer.output.dense.bias)

        with E.splice_pair(model, hooks.input, hooks.output, exact, mask):
            same = model(**inputs).last_hidden_state
        with E.splice_pair(model, hooks.input, hooks.output, lambda x, y: torch.zeros_like(y), mask):
            zeroed = model(**inputs).last_hidden_state
    n = int(mask.sum())
    assert seen == [((n, 384), (n, 384))]
    torch.testing.assert_close(same[mask], clean[mask])
    assert (zeroed[mask] - clean[mask]).abs().max() > 0.1
    late = C.HookSpec(f"encoder.layer.{minilm.LAYER + 1}.intermediate", "input")
    refused = pytest.raises(RuntimeError, match="ran before encoder.layer.4.intermediate .* input must come before")
    with refused, torch.no_grad(), E.splice_pair(model, late, hooks.output, lambda x, y: y, mask):
        model(**inputs)


def test_train_a_skip_transcoder_from_a_pair_of_files_and_resume(tmp_path, capsys):
    """d_in and d_out come from the data; the saved folder is a SAELens skip-transcoder; the run config records the
    widths and a resume on data of other widths is refused in one line."""
    pairs = minilm.mlp_pairs()
    x, y = split_pair(pairs, 384)
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    save_file({"y": y[:, :200].contiguous()}, str(tmp_path / "y.safetensors"))
    spec = f"{tmp_path / 'x.safetensors'},{tmp_path / 'y.safetensors'}"
    out = tmp_path / "run"
    args = ["train", "--data", spec, "--d-sae", "64", "--k", "4", "--batch-size", "64", "--skip-connection"]
    args += ["--out", str(out), "--no-plots", "--no-progress", "--checkpoint-every", "3", "--log-every", "3"]
    assert cli.main([*args, "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "topk skip-transcoder, d_in=384, d_out=200, d_sae=64, k=4" in printed and "explained_variance" in printed
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_out"], cfg["architecture"]) == (384, 200, "topk_skip_transcoder")
    assert json.loads((out / "run_config.json").read_text())["widths"] == {"d_in": 384, "d_out": 200}
    assert cli.main([*args, "--steps", "6", "--resume"]) == 0
    save_file({"y": y[:, :100].contiguous()}, str(tmp_path / "y.safetensors"))  # the same spec, other data
    with pytest.raises(SystemExit, match=r"the run was trained on \(x, y\) pairs d_in=384, d_out=200 but .* d_out=100"):
        cli.main([*args, "--steps", "9", "--resume"])


def test_train_a_transcoder_live_from_two_hooks(tmp_path, monkeypatch, capsys):
    loaded = minilm.model()
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": loaded)
    monkeypatch.setattr(C, "offline_texts", lambda source="pydoc": list(minilm.texts(8)))
    out = tmp_path / "live"
    args = ["train", "--data", "live:minilm:encoder.layer.3.intermediate", "--target-hook"]
    args += ["encoder.layer.3.output.dense", "--d-sae", "64", "--k", "4", "--batch-size", "64", "--steps", "2"]
    assert cli.main([*args, "--out", str(out), "--no-plots", "--no-progress"]) == 0
    assert "topk transcoder, d_in=384, d_out=384" in capsys.readouterr().out
    meta = json.loads((out / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "encoder.layer.3.intermediate"
    assert meta["hook_name_out"] == "encoder.layer.3.output.dense"
    assert meta["target_hook_spec"] == minilm.mlp_hooks().output.to_dict()


def test_evaluate_splices_an_exact_skip_transcoder_of_a_linear_map():
    """y = the output of layer 3's output.dense, x = its input: a skip-transcoder whose skip path is that linear map
    (W_skip = its weight, b_dec = its bias, W_dec = 0) predicts y exactly, so splicing it in changes nothing
    (scores 1, explained variance of y 1) while the ablations of y do change the model."""
    from fusedsae import evals as E

    model, tok = minilm.model()
    dense = model.encoder.layer[minilm.LAYER].output.dense
    x_hook = C.HookSpec("encoder.layer.3.output.dense", "input")
    y_hook = C.HookSpec("encoder.layer.3.output.dense", "output")
    tc = SparseAutoencoder(d_in=1536, d_out=384, d_sae=8, activation="topk", k=1, skip_connection=True)
    with torch.no_grad():
        tc.W_skip.copy_(dense.weight)
        tc.b_dec.copy_(dense.bias)
        tc.W_dec.zero_()
    batches = E.text_batches(tok, list(minilm.texts(4)), 4, 128)
    result = E.evaluate(model, batches, [E.Target("tc", tc.eval(), x_hook, y_hook)])
    row = result.metrics["tc"]
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert row["embedding_score"] == pytest.approx(1.0, abs=1e-5)
    assert row["hidden_mse_with_sae"] < 1e-6 < 0.1 < row["hidden_mse_with_ablation"]
    assert result.info["target_hooks"]["tc"] == y_hook.to_dict()


def test_matryoshka_skip_transcoder_gradients_match_dense_masking():
    """The Matryoshka loss of a skip-transcoder goes through the fused prefix op with the target y - skip: every
    gradient (W_skip's through that target) equals a dense float64 implementation's (prefix masks, skip added)."""
    torch.manual_seed(0)
    kwargs = dict(d_in=7, d_out=5, d_sae=17, activation="topk", k=4, skip_connection=True, dtype="float64")
    sae = SparseAutoencoder(**kwargs, matryoshka_widths=[3, 8])
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.W_skip.normal_(0, 0.3)
    x, y = torch.randn(33, 7, dtype=torch.float64), torch.randn(33, 5, dtype=torch.float64)
    sae.training_forward(x, y).loss.backward()
    fused = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    pre = x @ sae.W_enc + sae.b_enc
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    skip = x @ sae.W_skip.t()
    loss = sum(((acts[:, :w] @ sae.W_dec[:w] + sae.b_dec + skip - y) ** 2).sum(-1).mean() for w in (3, 8, 17))
    loss.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)
    assert fused["W_skip"].abs().max() > 0.1


def test_train_a_transcoder_with_eval_every_scores_the_transcoder(tmp_path, monkeypatch):
    """`fusedsae train --eval-every` on a pair cache evaluates the transcoder: x read at the cache's hook, y replaced
    at its target hook, reconstruction metrics against y. The last eval.jsonl row (the saved transcoder) is
    recomputed here by hand on the batches the callback used: y's explained variance, and the hidden-state error of
    a forward pass whose MLP output rows are replaced by the transcoder of the MLP input rows (and by zeros, the
    ablation). A sweep of transcoders from the same cache evaluates each of them the same way."""
    from fusedsae import evals as E

    model, tok = minilm.model()
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu", with_head=False: (model, tok))
    seen = []
    real_evaluate = E.evaluate

    def spy(model_, batches, targets):
        seen.append((list(batches), list(targets)))
        return real_evaluate(model_, batches, targets)

    monkeypatch.setattr(E, "evaluate", spy)
    hooks = _mlp()
    texts = list(minilm.texts(12))
    source = {"model": "minilm", "text": "pydoc"}
    K.write_cache(
        tmp_path / "pairs", model, tok, texts, hooks.input, source=source, max_length=64, target_hook=hooks.output
    )
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "pairs"), "--d-sae", "64", "--batch-size", "64", "--log-every", "1"]
    args += ["--eval-every", "2", "--eval-tokens", "100", "--no-plots", "--no-progress"]
    assert cli.main([*args, "--k", "4", "--steps", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and len(seen) == 2
    batches, targets = seen[-1]
    assert [(t.hook, t.target_hook) for t in targets] == [(hooks.input, hooks.output)]

    tc = load_sae(out / "sae").eval()
    assert tc.cfg.d_out == 384
    sse = sse_x = sum_y = sum_x = sum_sq = sum_sq_x = hidden_sse = ablated_sse = 0.0
    n = 0
    for inputs in batches:
        mask = inputs["attention_mask"].bool()
        with torch.no_grad():
            clean = model(**inputs).last_hidden_state
            spliced = _mlp_output_replaced_by_hand(model, inputs, lambda x: tc(x.to(tc.dtype)))
            ablated = _mlp_output_replaced_by_hand(model, inputs, torch.zeros_like)
            pair = C.capture_pairs(model, inputs, hooks.input, hooks.output).acts
            y_hat = tc(pair["x"].to(tc.dtype)).double()
        x, y = pair["x"].double(), pair["y"].double()
        sse += float((y_hat - y).pow(2).sum())
        sum_sq += float(y.pow(2).sum())
        sum_y = sum_y + y.sum(0)
        sse_x += float((y_hat - x).pow(2).sum())  # what an SAE's reading (reconstruct x) would score
        sum_sq_x += float(x.pow(2).sum())
        sum_x = sum_x + x.sum(0)
        hidden_sse += float((spliced - clean)[mask].double().pow(2).sum())
        ablated_sse += float((ablated - clean)[mask].double().pow(2).sum())
        n += int(mask.sum())
    explained = 1.0 - sse / (sum_sq - float(sum_y.pow(2).sum()) / n)
    explained_x = 1.0 - sse_x / (sum_sq_x - float(sum_x.pow(2).sum()) / n)
    last = rows[-1]
    assert last["eval_tokens"] == n
    assert last["explained_variance"] == pytest.approx(explained, rel=1e-6, abs=1e-9)
    assert abs(explained - explained_x) > 0.1, "the check above must tell y from x"
    assert last["hidden_mse_with_sae"] == pytest.approx(hidden_sse / n, rel=1e-4)
    assert last["hidden_mse_with_ablation"] == pytest.approx(ablated_sse / n, rel=1e-4)  # y zeroed, not x
    # a sweep of transcoders evaluates each of them the same way
    seen.clear()
    assert cli.main([*args, "--k", "2,4", "--steps", "2", "--out", str(tmp_path / "sweep")]) == 0
    assert [(t.hook, t.target_hook) for _, targets in seen for t in targets] == [(hooks.input, hooks.output)] * 2
    for name in ("k2", "k4"):
        rows = [json.loads(line) for line in (tmp_path / "sweep" / name / "eval.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2] and rows[0]["eval_tokens"] == n


def _mlp_output_replaced_by_hand(model, inputs, fn):
    """MiniLM's last hidden state with layer 3's MLP output (real tokens) replaced by ``fn`` of that MLP's input."""
    layer = model.encoder.layer[minilm.LAYER]
    mask = inputs["attention_mask"].bool()
    kept = {}

    def replace(module, args, output):
        output = output.clone()
        output[mask] = fn(kept["x"][mask]).to(output.dtype)
        return output

    pre = layer.intermediate.register_forward_pre_hook(lambda module, args: kept.update(x=args[0]))
    post = layer.output.dense.register_forward_hook(replace)
    try:
        return model(**inputs).last_hidden_state
    finally:
        pre.remove()
        post.remove()
