"""Spliced-in evaluation (fusedsae.evals): CE, KL and their scores on a tiny random GPT-2 checked against a hand
computation on unpadded single-text runs; an identity SAE recovers 100% and a zero SAE 0%; reconstruction metrics
against fusedsae.metrics; the error term added back; MiniLM's embedding metrics with real weights."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import minilm
from fusedsae import SparseAutoencoder
from fusedsae import capture as C
from fusedsae import evals as E
from fusedsae import metrics as M

VOCAB, WIDTH, HEADS = 97, 48, 4
Z0 = C.HookSpec("h.0.attn.c_proj", "input")  # attention z of layer 0 (resolves to transformer.h.0.attn.c_proj)
RESID1 = C.HookSpec("h.1.mlp", "output")  # an output hook: layer 1's MLP output


@functools.cache
def gpt2():
    """A randomly initialised 2-layer GPT-2 with an LM head (init scale 0.2 so that ablations change its output)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=WIDTH,
        n_layer=2,
        n_head=HEADS,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


def batches(lengths=((16, 9, 12), (5, 16))):
    """Right-padded batches of random token ids with the given real lengths (padding id 0)."""
    out = []
    for group in lengths:
        s = max(group)
        ids = torch.randint(1, VOCAB, (len(group), s))
        mask = torch.zeros(len(group), s, dtype=torch.long)
        for i, n in enumerate(group):
            mask[i, :n] = 1
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def texts_of(bs):
    """Each text's real token ids, unpadded."""
    return [b["input_ids"][i, : int(b["attention_mask"][i].sum())] for b in bs for i in range(b["input_ids"].shape[0])]


def random_sae(d_in=WIDTH, n_heads=None, **kw):
    sae = SparseAutoencoder(d_in=d_in, d_sae=96, activation="topk", k=8, n_heads=n_heads, **kw)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def identity_sae(d_in=WIDTH):
    """A ReLU SAE whose reconstruction is x exactly: relu(x) - relu(-x), every product by 1 or 0."""
    sae = SparseAutoencoder(d_in=d_in, d_sae=2 * d_in, activation="relu")
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae(d_in=WIDTH):
    sae = SparseAutoencoder(d_in=d_in, d_sae=16, activation="relu")
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae.eval()


def hand_logits(ids, hook, replace):
    """Logits ``[n, vocab]`` of one unpadded text, with ``replace(x [n, width])`` at ``hook`` (None: clean), through
    a plain hook written here, not fusedsae's splice."""
    model = gpt2()
    module = C.find_module(model, hook.module)
    handle = None
    if replace is not None:
        if hook.io == "input":
            handle = module.register_forward_pre_hook(lambda m, a: (replace(a[0][0])[None],))
        else:
            handle = module.register_forward_hook(lambda m, a, out: replace(out[0])[None])
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0].double()
    finally:
        if handle is not None:
            handle.remove()


def hand_metrics(bs, hook, sae):
    """CE (per next-token prediction) and KL (per token) of clean, SAE, zero- and mean-ablated runs, one text at a
    time, in float64."""
    texts = texts_of(bs)
    acts = []
    for ids in texts:
        rec = C.Recorder(gpt2(), {"a": hook})
        with torch.no_grad(), rec:
            gpt2()(ids[None])
        acts.append(rec.tensors["a"][0])
    mu = torch.cat(acts).double().mean(0).float()
    runs = {
        "clean": None,
        "sae": lambda x: sae(x),
        "zero": torch.zeros_like,
        "mean": lambda x: mu.expand_as(x).clone(),
    }
    ce = dict.fromkeys(runs, 0.0)
    kl = dict.fromkeys(runs, 0.0)
    n_ce = n_tok = 0
    for ids in texts:
        clean = F.log_softmax(hand_logits(ids, hook, None), -1)
        for name, replace in runs.items():
            logp = F.log_softmax(hand_logits(ids, hook, replace), -1)
            ce[name] += sum(-float(logp[p, ids[p + 1]]) for p in range(len(ids) - 1))
            kl[name] += float(F.kl_div(logp, clean, log_target=True, reduction="sum"))
        n_ce += len(ids) - 1
        n_tok += len(ids)
    return {k: v / n_ce for k, v in ce.items()}, {k: v / n_tok for k, v in kl.items()}


@pytest.mark.parametrize("hook", [Z0, RESID1], ids=["input-hook", "output-hook"])
def test_ce_and_kl_match_a_hand_computation(hook):
    """Padded batched eval = per-text unpadded runs computed by hand (float32 model: rtol 1e-5 on per-token means of
    order 5; the KL values are small differences of such numbers, compared with an absolute tolerance too)."""
    bs = batches()
    sae = random_sae()
    result = E.evaluate(gpt2(), bs, [E.Target("sae", sae, hook)])
    m = result.metrics["sae"]
    ce, kl = hand_metrics(bs, hook, sae)
    assert result.head == "causal"
    assert result.n_tokens == sum(len(t) for t in texts_of(bs))
    close = functools.partial(pytest.approx, rel=1e-5, abs=1e-6)
    assert m["ce_loss_without_sae"] == close(ce["clean"])
    assert m["ce_loss_with_sae"] == close(ce["sae"])
    assert m["ce_loss_with_ablation"] == close(ce["zero"])
    assert m["ce_loss_with_mean_ablation"] == close(ce["mean"])
    assert m["kl_div_with_sae"] == close(kl["sae"])
    assert m["kl_div_with_ablation"] == close(kl["zero"])
    assert m["kl_div_with_mean_ablation"] == close(kl["mean"])
    assert abs(kl["clean"]) < 1e-9
    # the scores are the SAELens formulas of those numbers; the ablations must matter for them to mean anything
    assert ce["zero"] - ce["clean"] > 1e-3 or ce["clean"] - ce["zero"] > 1e-3
    expected = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert m["ce_loss_score"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert m["kl_div_score"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], rel=1e-3, abs=1e-3)


def test_identity_sae_recovers_everything_and_zero_sae_nothing():
    bs = batches()
    ident, zero = identity_sae(), zero_sae()
    x = torch.randn(50, WIDTH)
    assert torch.equal(ident(x), x), "the identity SAE must reconstruct exactly for the test to mean 100%"
    result = E.evaluate(gpt2(), bs, [E.Target("identity", ident, Z0), E.Target("zero", zero, Z0)])
    i, z = result.metrics["identity"], result.metrics["zero"]
    assert i["ce_loss_with_sae"] == i["ce_loss_without_sae"]
    assert i["ce_loss_score"] == 1.0 and i["ce_loss_score_mean_ablation"] == 1.0
    assert i["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9) and i["kl_div_score"] == pytest.approx(1.0)
    assert i["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert i["cossim"] == pytest.approx(1.0) and i["l2_ratio"] == pytest.approx(1.0)
    # the zero SAE's reconstruction is the zero ablation, bit for bit
    assert z["ce_loss_with_sae"] == z["ce_loss_with_ablation"]
    assert z["ce_loss_score"] == 0.0 and z["kl_div_score"] == 0.0
    assert z["l0"] == 0.0 and z["dead_fraction"] == 1.0
    # the two ablations are different baselines
    assert z["ce_loss_with_mean_ablation"] != z["ce_loss_with_ablation"]


def test_reconstruction_metrics_match_fusedsae_metrics():
    """Held-out reconstruction metrics from the splice = fusedsae.metrics and plain formulas on the captured z."""
    bs = batches()
    sae = random_sae(n_heads=HEADS)
    m = E.evaluate(gpt2(), bs, [E.Target("sae", sae, Z0)]).metrics["sae"]
    x = torch.cat([C.capture(gpt2(), b, {"z": Z0}).acts["z"] for b in bs])
    with torch.no_grad():
        x_hat = sae(x)
        acts = sae.encode(x)
    close = functools.partial(pytest.approx, rel=1e-5, abs=1e-7)
    assert m["fvu"] == close(float(M.fvu(x, x_hat)))
    assert m["explained_variance"] == close(float(M.explained_variance(x, x_hat)))
    assert m["mse"] == close(float(M.mse(x, x_hat)))
    assert m["mse_per_element"] == close(float(M.mse(x, x_hat)) / WIDTH)
    assert m["cossim"] == close(float(F.cosine_similarity(x, x_hat, dim=-1).mean()))
    assert m["l2_ratio"] == close(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()))
    fired = (acts != 0).sum(0)
    assert m["l0"] == close(float((acts != 0).sum(-1).float().mean()))
    assert m["dead_fraction"] == close(float((fired == 0).float().mean()))
    assert m["dense_fraction"] == close(float((fired > 0.1 * x.shape[0]).float().mean()))
    per_head = (x - x_hat).pow(2).reshape(-1, HEADS, WIDTH // HEADS).sum((0, 2))
    assert m["head_error_share"] == pytest.approx((per_head / per_head.sum()).tolist(), rel=1e-5)
    assert math.isclose(sum(m["head_error_share"]), 1.0, rel_tol=1e-9)


def test_error_term_added_back_keeps_the_output_and_trains_through_the_sae():
    model, sae = gpt2(), random_sae()
    b = batches(((10, 7),))[0]
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        clean = model(**b).logits
    with E.splice_sae(model, Z0, sae, mask=mask, add_error=True):
        spliced = model(**b).logits
    with E.splice_sae(model, Z0, sae, mask=mask):
        plain = model(**b).logits
    # x_hat + (x - x_hat) is x up to one rounding of each add: float32 tolerances, far below the SAE's own effect
    torch.testing.assert_close(spliced[mask], clean[mask])
    assert (plain[mask] - clean[mask]).abs().max() > 1e-3
    spliced[mask].logsumexp(-1).sum().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_evaluate_refuses_bad_input():
    with pytest.raises(ValueError, match="no SAEs"):
        E.evaluate(gpt2(), batches(), [])
    sae = random_sae()
    with pytest.raises(ValueError, match="names must differ"):
        E.evaluate(gpt2(), batches(), [E.Target("a", sae, Z0), E.Target("a", sae, RESID1)])


# ---------------------------------------------------------------------------------------------------------------
# MiniLM (real weights, no LM head): embedding metrics
# ---------------------------------------------------------------------------------------------------------------


def _minilm_batches(n=12):
    _, tok = minilm.model()
    return E.text_batches(tok, list(minilm.texts(n)), batch_size=6, max_length=64)


def test_minilm_embedding_metrics():
    """embedding_score on MiniLM: identity 1, zero SAE 0, a trained TopK SAE in between; the zero-ablation cosine
    against a hand computation (each text alone, z zeroed by a plain hook, mean-pooled final hidden states)."""
    model, tok = minilm.model()
    hook = minilm.hooks().z
    bs = _minilm_batches()
    trained = minilm.trained_sae("topk")
    result = E.evaluate(
        model,
        bs,
        [
            E.Target("trained", trained, hook),
            E.Target("identity", identity_sae(minilm.D_IN), hook),
            E.Target("zero", zero_sae(minilm.D_IN), hook),
        ],
    )
    assert result.head == "none"
    t, i, z = (result.metrics[k] for k in ("trained", "identity", "zero"))
    assert i["embedding_score"] == pytest.approx(1.0, abs=1e-6)
    assert i["hidden_mse_with_sae"] == pytest.approx(0.0, abs=1e-9)
    assert z["embedding_score"] == 0.0 and z["hidden_mse_score"] == 0.0
    assert 0.0 < t["embedding_score"] < 1.0 and 0.0 < t["embedding_score_mean_ablation"] < 1.0
    assert 0.5 < t["explained_variance"] < 1.0
    assert t["l0"] == pytest.approx(16.0, abs=0.5)
    assert len(t["head_error_share"]) == minilm.N_HEADS
    # hand computation of the zero-ablation cosine
    module = C.find_module(model, hook.module)
    cosines = []
    for text in minilm.texts(12):
        ids = C.tokenize(tok, [text], 64)
        with torch.no_grad():
            clean = model(**ids).last_hidden_state[0].mean(0)
            handle = module.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
            try:
                ablated = model(**ids).last_hidden_state[0].mean(0)
            finally:
                handle.remove()
        cosines.append(float(F.cosine_similarity(clean, ablated, dim=0)))
    assert z["embedding_cossim_with_ablation"] == pytest.approx(sum(cosines) / len(cosines), rel=1e-5)
    assert t["embedding_cossim_with_ablation"] == z["embedding_cossim_with_ablation"]
    table = result.table()
    assert "embedding_score" in table and "trained" in table


def test_cli_eval_on_own_text(tmp_path, capsys):
    """`fusedsae eval` reads the hook and the model from the SAE's metadata, evaluates on a text file, prints the
    table and writes JSON with SAELens's names (and a plot); user mistakes are one line."""
    from fusedsae import cli

    sae = minilm.trained_sae("topk")
    saved = SparseAutoencoder(
        sae.cfg.replace(metadata={"model_name": "minilm", "hook_spec": minilm.hooks().z.to_dict()})
    )
    saved.load_state_dict(sae.state_dict())
    saved.save(tmp_path / "run" / "sae")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(minilm.texts(6)[i].replace("\n", " ") for i in range(6)) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    args = ["eval", "--sae", str(tmp_path / "run" / "sae"), "--text", str(corpus), "--split", "all"]
    assert cli.main([*args, "--json", str(out), "--max-tokens", "400"]) == 0
    printed = capsys.readouterr().out
    assert "embedding_score" in printed and "explained_variance" in printed
    record = json.loads(out.read_text())
    metrics = record["saes"]["run"]
    assert record["head"] == "none" and record["model"] == "minilm" and 0 < record["n_tokens"] <= 400
    assert 0.0 < metrics["embedding_score"] < 1.0 and metrics["l0"] == pytest.approx(16.0, abs=0.5)
    assert (tmp_path / "eval.png").stat().st_size > 1000
    bare = tmp_path / "bare"
    SparseAutoencoder(d_in=minilm.D_IN, d_sae=64, activation="topk", k=4).save(bare)
    with pytest.raises(SystemExit, match="give --hook and --io"):
        cli.main(["eval", "--sae", str(bare), "--json", str(out)])
    with pytest.raises(SystemExit, match="does not record its model"):
        cli.main(["eval", "--sae", str(bare), "--hook", minilm.hooks().z.module, "--json", str(out)])
    with pytest.raises(SystemExit, match="no such file or folder"):
        cli.main([*args[:3], "--text", str(tmp_path / "nothing.txt"), "--model", "minilm", "--json", str(out)])
    with pytest.raises(SystemExit, match="not a local Hugging Face model folder"):
        cli.main(["eval", "--sae", str(bare), "--hook", "x", "--model", str(tmp_path / "no-model"), "--json", str(out)])


def test_train_with_eval_every(tmp_path, monkeypatch):
    """`fusedsae train --eval-every N` on a cache: eval.jsonl gets the spliced-in metrics at steps N, 2N… and the
    last step, on the held-out split of the cache's text; a resumed run keeps only the lines up to its checkpoint."""
    from fusedsae import cache as K
    from fusedsae import cli

    model, tok = minilm.model()
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu", with_head=False: (model, tok))
    K.write_cache(
        tmp_path / "cache",
        model,
        tok,
        list(minilm.texts(12)),
        minilm.hooks().z,
        n_heads=minilm.N_HEADS,
        source={"model": "minilm", "text": "pydoc"},
        max_length=64,
    )
    args = ["train", "--data", str(tmp_path / "cache"), "--d-sae", "64", "--k", "4", "--batch-size", "64"]
    args += ["--eval-every", "4", "--eval-tokens", "100", "--log-every", "2", "--checkpoint-every", "4"]
    args += ["--out", str(tmp_path / "run"), "--no-plots", "--no-progress"]
    assert cli.main([*args, "--steps", "6"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 6]
    assert all(0 < r["eval_tokens"] <= 100 and r["embedding_score"] is not None for r in rows)
    assert rows[0]["l0"] == pytest.approx(4.0, abs=0.01)
    (tmp_path / "run" / "eval.jsonl").write_text("".join(json.dumps({**r, "step": 7}) + "\n" for r in rows[-1:]))
    assert cli.main([*args, "--steps", "10", "--resume"]) == 0  # from the final checkpoint, step 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 10], "a line after the checkpoint (step 7) must be dropped"
    with pytest.raises(SystemExit, match="--eval-every needs data captured from a model"):
        cli.main(["train", "--eval-every", "2", "--steps", "2", "--out", str(tmp_path / "toy"), "--no-progress"])


@functools.cache
def bert_mlm():
    """A randomly initialised 2-layer BERT with a masked-LM head."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=96,
        max_position_embeddings=32,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return BertForMaskedLM(config).eval()


def test_masked_lm_ce_and_kl_match_a_hand_computation():
    """A masked LM: CE of the masked tokens (fixed positions) and KL over all real tokens, against per-text unpadded
    runs through a plain hook; the zero SAE scores 0 and the identity 1."""
    model = bert_mlm()
    hook = C.HookSpec("encoder.layer.0.attention.output.dense", "input")
    bs = E.mask_for_mlm(batches(), mask_token_id=VOCAB - 1, fraction=0.3)
    assert sum(int((b["mlm_labels"] != -100).sum()) for b in bs) > 5
    with pytest.raises(ValueError, match="mask_for_mlm"):
        E.evaluate(model, batches(), [E.Target("z", zero_sae(), hook)])
    sae = random_sae()
    targets = [E.Target("sae", sae, hook), E.Target("zero", zero_sae(), hook), E.Target("id", identity_sae(), hook)]
    result = E.evaluate(model, bs, targets)
    assert result.head == "masked"
    module = C.find_module(model, hook.module)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    n_ce = n_tok = 0
    for b in bs:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            ids, labels = b["input_ids"][i, :n], b["mlm_labels"][i, :n]
            logp = {}
            for name, replace in (("clean", None), ("sae", sae), ("zero", torch.zeros_like)):
                hooked = None if replace is None else (lambda m, a, f=replace: (f(a[0]),))
                handle = None if hooked is None else module.register_forward_pre_hook(hooked)
                try:
                    with torch.no_grad():
                        logp[name] = F.log_softmax(model(ids[None]).logits[0].double(), -1)
                finally:
                    if handle is not None:
                        handle.remove()
                at = labels != -100
                ce[name] += float(-logp[name][at].gather(-1, labels[at][:, None]).sum())
            for name in kl:
                kl[name] += float(F.kl_div(logp[name], logp["clean"], log_target=True, reduction="sum"))
            n_ce += int((labels != -100).sum())
            n_tok += n
    m = result.metrics["sae"]
    close = functools.partial(pytest.approx, rel=1e-5, abs=1e-6)
    assert m["ce_loss_without_sae"] == close(ce["clean"] / n_ce)
    assert m["ce_loss_with_sae"] == close(ce["sae"] / n_ce)
    assert m["ce_loss_with_ablation"] == close(ce["zero"] / n_ce)
    assert m["kl_div_with_sae"] == close(kl["sae"] / n_tok)
    assert m["kl_div_with_ablation"] == close(kl["zero"] / n_tok)
    assert result.metrics["zero"]["ce_loss_score"] == 0.0
    assert result.metrics["id"]["ce_loss_score"] == 1.0
