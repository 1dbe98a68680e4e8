"""Capture from Hugging Face models by module path: padding removed (checked against per-text unpadded runs), module
input vs output hooks, head-major reshapes, attention internals (z = A v per head) on MiniLM-L6 and a tiny GPT-2."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F

import minilm
from conftest import assert_close_lowp
from fusedsae import capture as C

DENSE = f"encoder.layer.{minilm.LAYER}.attention.output.dense"


@functools.cache
def _model64():
    return copy.deepcopy(minilm.model()[0]).double()


def _capture64(inputs, spec):
    recorder = C.Recorder(_model64(), {"a": spec})
    with torch.no_grad(), recorder:
        _model64()(**inputs)
    return C.to_tokens(recorder.tensors["a"], inputs["attention_mask"].bool())


def test_padding_is_masked_out_and_changes_nothing():
    """A padded batch gives exactly the real tokens of each text, in order, and the same z as running each text
    alone: its error against a float64 model is at most twice that of the unpadded float32 runs (STYLE §10)."""
    model, tok = minilm.model()
    texts = [minilm.texts()[i] for i in (0, 5, 9, 14, 21)]  # lengths 20..128 tokens: heavy padding
    spec = C.HookSpec(DENSE, "input")
    inputs = C.tokenize(tok, texts, 128)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2, "the texts must differ in length for padding to matter"
    batch = C.capture(model, inputs, {"z": spec}, text_offset=100)
    assert batch.n_tokens == int(lengths.sum())
    for i, text in enumerate(texts):
        rows = batch.text_index == 100 + i
        n = int(lengths[i])
        assert torch.equal(batch.position[rows], torch.arange(n))
        assert torch.equal(batch.token_ids[rows], inputs["input_ids"][i, :n])
        alone = C.capture(model, C.tokenize(tok, [text], 128), {"z": spec}).acts["z"]
        exact = _capture64(C.tokenize(tok, [text], 128), spec)
        assert alone.shape == (n, minilm.D_IN)
        assert_close_lowp(batch.acts["z"][rows], alone, exact, f"text {i}")
    assert not (batch.token_ids == tok.pad_token_id).any()


def test_input_and_output_hooks():
    """The output hook of the projection equals the projection applied to its input hook, and the input of the
    projection is the attention block's own output (z) — all from one forward pass."""
    model, tok = minilm.model()
    specs = {
        "in": C.HookSpec(DENSE, "input"),
        "out": C.HookSpec(DENSE, "output"),
        "self": C.HookSpec(f"encoder.layer.{minilm.LAYER}.attention.self", "output", index=0),
    }
    batch = C.capture(model, C.tokenize(tok, list(minilm.texts(8)), 128), specs)
    dense = C.find_module(model, DENSE)
    assert torch.equal(batch.acts["self"], batch.acts["in"])
    torch.testing.assert_close(batch.acts["out"], F.linear(batch.acts["in"], dense.weight, dense.bias))
    assert batch.acts["in"].shape == (batch.n_tokens, minilm.D_IN)


def test_head_major_reshape_matches_the_model():
    """The model's own per-head split (view as [.., heads, d_head]) is what head-major means: 4-D layouts reshape
    back to it, and head h of z is A_h @ v_h for the value columns h*d_head:(h+1)*d_head."""
    cap = minilm.layer3()
    b, s, _ = cap.values.shape
    per_head = cap.values.view(b, s, minilm.N_HEADS, minilm.D_HEAD)
    flat = C.to_tokens(cap.values, cap.mask)
    assert torch.equal(C.to_tokens(per_head, cap.mask, "bshd"), flat)
    assert torch.equal(C.to_tokens(per_head.transpose(1, 2).contiguous(), cap.mask, "bhsd"), flat)
    assert torch.equal(C.to_tokens(per_head, cap.mask), flat)  # auto: seq (128) is not heads (12)
    for h in (0, 5, 11):
        cols = slice(h * minilm.D_HEAD, (h + 1) * minilm.D_HEAD)
        z_h = cap.attention[:, h] @ cap.values[..., cols]
        torch.testing.assert_close(z_h[cap.mask], cap.z[cap.mask][:, cols])
    with pytest.raises(ValueError, match="cannot tell the layout"):
        C.to_tokens(torch.zeros(2, 4, 4, 3), torch.ones(2, 4, dtype=torch.bool))


def test_padded_sources_get_no_attention():
    cap = minilm.layer3()
    pads = ~cap.mask
    assert pads.any()
    assert torch.equal(cap.attention.masked_select(pads[:, None, None, :]).abs().max(), torch.tensor(0.0))
    rows = cap.attention.sum(-1)[cap.mask.unsqueeze(1).expand(-1, minilm.N_HEADS, -1)]
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_module_paths_resolve_by_suffix_and_fail_clearly():
    model, _ = minilm.model()
    assert C.find_module(model, "layer.3.attention.output.dense") is C.find_module(model, DENSE)
    with pytest.raises(ValueError, match=r"no module 'encoder\.layer\.3\.attention\.nope'"):
        C.find_module(model, "encoder.layer.3.attention.nope")
    with pytest.raises(ValueError, match="ambiguous"):
        C.find_module(model, "dense")
    with pytest.raises(ValueError, match="out of range"):
        C.attention_hooks(model, 6)
    with pytest.raises(ValueError, match="io must be"):
        C.HookSpec(DENSE, "inside")


def test_gpt2_preset_on_a_tiny_random_model():
    """Generic capture: GPT-2's z is the input of attn.c_proj and its values the last third of the fused qkv
    projection; with causal attention and a padded batch, z_h = A_h v_h still holds for the real tokens."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=48, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    cfg._attn_implementation = "eager"
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    hooks = C.attention_hooks(model, 1)
    cap = C.capture_attention(model, {"input_ids": ids, "attention_mask": mask}, hooks)
    v = cap.values.view(3, 9, 4, 12).transpose(1, 2)
    z = (cap.attention @ v).transpose(1, 2).reshape(3, 9, 48)
    torch.testing.assert_close(z[cap.mask], cap.z[cap.mask])
    assert torch.equal(torch.triu(cap.attention[0, 0], diagonal=1), torch.zeros(9, 9))
    batch = C.capture(model, {"input_ids": ids, "attention_mask": mask}, {"z": hooks.z})
    assert torch.equal(batch.acts["z"], cap.z[cap.mask])


def test_offline_texts_are_fixed_and_clean():
    first = C.offline_texts("pydoc")
    assert first == C.offline_texts("pydoc") and len(first) > 1000
    assert all(len(t) >= 40 for t in first)
    both = C.offline_texts("all")
    assert len(set(both)) == len(both) > len(first)
    underline = re.compile(r"^\s*([*=~^\-])\1{2,}\s*$")  # reST section underlines carry no text
    assert not any(underline.match(line) for t in first for line in t.splitlines())
    assert any("*****" in t for t in first)  # while code examples keep their stars
    assert len(C.offline_texts("stdlib")) > 100
    _, tok = minilm.model()
    chosen = C.texts_up_to(tok, first[:50], 500, 128)
    lengths = [len(ids) for ids in tok(first[:50], truncation=True, max_length=128)["input_ids"]]
    assert sum(lengths[: len(chosen)]) <= 500 < sum(lengths[: len(chosen) + 1])
    with pytest.raises(ValueError, match="unknown text source"):
        C.offline_texts("wikipedia")
