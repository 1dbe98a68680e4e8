"""Drop-in layers (fusedsae.compat.sae_lens / .sparsify) and the peers' file formats.

Without the peers installed (CI), the comparisons run against tests/fixtures written by SAELens 6.54, sparsify
1.3.3 and dictionary_learning themselves (tests/fixtures/make_fixtures.py); with them installed, the same maths,
gradients, training loops and files are also compared live on fresh random weights.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from safetensors.torch import load_file

import fusedsae
from conftest import FIXTURES
from fusedsae import SAEFormatError
from fusedsae.compat import sae_lens as csl
from fusedsae.compat import sparsify as csp

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own Triton decoder needs a GPU


def expected(folder):
    return load_file(str(folder / "expected.safetensors"))


def peer(name):
    return pytest.importorskip(name, reason=f"{name} not installed (the fixtures cover it in CI)")


# ---------------------------------------------------------------------------------------------------------------
# JumpReLU with negative thresholds, BatchTopK and gated SAELens folders
# ---------------------------------------------------------------------------------------------------------------


def test_jumprelu_with_negative_thresholds_matches_sae_lens():
    folder = FIXTURES / "saelens_jumprelu_negative"
    want = expected(folder)
    for sae in (fusedsae.load(folder).eval(), csl.SAE.load_from_disk(folder)):
        assert (sae.threshold < 0).any() and (sae.threshold > 0).any()
        acts = sae.encode(want["x"])
        assert (acts >= 0).all()
        torch.testing.assert_close(acts, want["encode"])
        torch.testing.assert_close(sae(want["x"]), want["forward"])


def test_sae_lens_batchtopk_training_folder_serves_as_sae_lens_does():
    folder = FIXTURES / "saelens_batchtopk"
    want = expected(folder)
    ours = fusedsae.load(folder).eval()  # eval: the inference threshold, as SAELens's own inference save
    assert ours.cfg.activation == "batchtopk" and ours.cfg.k == 3
    torch.testing.assert_close(ours.encode(want["x"]), want["encode"])
    torch.testing.assert_close(ours(want["x"]), want["forward"])
    inference = csl.SAE.load_from_disk(folder)
    assert isinstance(inference, csl.JumpReLUSAE)
    torch.testing.assert_close(inference.encode(want["x"]), want["encode"])
    training = csl.TrainingSAE.load_from_disk(folder)
    assert isinstance(training, csl.BatchTopKTrainingSAE) and float(training.topk_threshold) > 0


def test_sae_lens_gated_folder_loads_for_inference():
    folder = FIXTURES / "saelens_gated"
    want = expected(folder)
    sae = fusedsae.load(folder)
    assert isinstance(sae, csl.GatedSAE)
    torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
    torch.testing.assert_close(sae(want["x"]), want["forward"])
    with pytest.raises(ValueError, match="no .*training class"):
        csl.TrainingSAE.load_from_disk(folder)


# ---------------------------------------------------------------------------------------------------------------
# sparsify: skip connections, multi-layer roots, the compat SparseCoder
# ---------------------------------------------------------------------------------------------------------------


def test_sparsify_skip_connection_loads_and_runs_in_the_compat_layer():
    """sparsify's skip path on an SAE (x_hat += x @ W_skip.T) is SAEConfig(skip_connection=True) (issue 13)."""
    folder = FIXTURES / "sparsify_skip"
    want = expected(folder)
    sae = fusedsae.load(folder)
    assert sae.cfg.skip_connection and sae.cfg.d_out is None and sae.cfg.apply_b_dec_to_input
    torch.testing.assert_close(sae(want["x"]), want["forward"])
    coder = csp.SparseCoder.load_from_disk(folder)
    torch.testing.assert_close(coder(want["x"]).sae_out, want["forward"])


def test_sparsify_multilayer_root_lists_its_layers_and_loads_one():
    root = FIXTURES / "sparsify_multilayer"
    with pytest.raises(SAEFormatError, match=r"2 SAEs: layers\.0, layers\.1; load one with .*layer='layers\.0'"):
        fusedsae.load(root)
    with pytest.raises(SAEFormatError, match="no layer 'layers.7'; it holds layers.0, layers.1"):
        fusedsae.load(root, layer="layers.7")
    coders = csp.SparseCoder.load_many(root)
    assert list(coders) == ["layers.0", "layers.1"]
    for name in coders:
        want = expected(root / name)
        sae = fusedsae.load(root, layer=name)
        values, indices = sae.encode_sparse(want["x"])
        torch.testing.assert_close(sae.decode_sparse(values, indices), want["decode"])
        torch.testing.assert_close(coders[name].decode(*coders[name].encode(want["x"])[:2]), want["decode"])


def test_compat_sparse_coder_reads_sparsify_folders_and_writes_them_back(tmp_path):
    folder = FIXTURES / "sparsify_topk"
    want = expected(folder)
    coder = csp.SparseCoder.load_from_disk(folder)
    out = coder.encode(want["x"])
    assert isinstance(out, csp.EncoderOutput) and out.pre_acts.shape == (want["x"].shape[0], coder.num_latents)
    torch.testing.assert_close(out.top_acts, want["top_acts"])
    assert torch.equal(out.top_indices, want["top_indices"])
    torch.testing.assert_close(coder.decode(out.top_acts, out.top_indices), want["decode"])
    coder.save_to_disk(tmp_path / "again")
    again = csp.SparseCoder.load_from_disk(tmp_path / "again")
    assert again.cfg == coder.cfg and again.num_latents == 16 and again.encoder.weight.shape == (16, 8)
    for name, tensor in coder.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ours = fusedsae.load(tmp_path / "again")  # the plain layer reads the compat layer's folder too
    torch.testing.assert_close(ours.decode_sparse(*ours.encode_sparse(want["x"])), want["decode"])


@pytest.mark.parametrize(
    "name",
    ["saelens_standard", "saelens_topk", "saelens_topk_rescaled", "saelens_jumprelu", "saelens_gated", "sparsify_topk"],
)
def test_written_files_are_the_peers_own(tmp_path, name):
    """Without the peers installed: reading a peer's folder and writing it back reproduces the peer's own files
    (the same cfg.json and the same tensors), so the peer reads what the compat layers write."""
    import json

    folder = FIXTURES / name
    if name.startswith("sparsify"):
        csp.SparseCoder.load_from_disk(folder).save_to_disk(tmp_path)
        weights = "sae.safetensors"
    else:
        csl.SAE.load_from_disk(folder).save_model(tmp_path)
        weights = "sae_weights.safetensors"
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads((folder / "cfg.json").read_text())
    ours, theirs = load_file(str(tmp_path / weights)), load_file(str(folder / weights))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_sparse_coder_forward_losses_and_refusals():
    torch.manual_seed(0)
    coder = csp.SparseCoder(12, csp.SparseCoderConfig(num_latents=48, k=4, multi_topk=True), dtype=torch.float64)
    x = torch.randn(30, 12, dtype=torch.float64)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::5] = True
    out = coder(x, dead_mask=dead)
    recon = coder.decode(out.latent_acts, out.latent_indices)
    torch.testing.assert_close(out.sae_out, recon)
    total = (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, (x - recon).pow(2).sum() / total)
    wide = torch.topk(coder.encode(x).pre_acts, 16, dim=-1)  # Multi-TopK: the FVU of the 4k-sparse code
    torch.testing.assert_close(out.multi_topk_fvu, (x - coder.decode(wide.values, wide.indices)).pow(2).sum() / total)
    pre = coder.encode(x).pre_acts.masked_fill(~dead, -torch.inf)  # AuxK: the d_in // 2 largest dead pre_acts
    aux = torch.topk(pre, 6, dim=-1)
    e_hat = coder.decode(aux.values, aux.indices) - coder.b_dec
    residual = (x - recon).detach()
    torch.testing.assert_close(out.auxk_loss, min(10 / 6, 1.0) * (e_hat - residual).pow(2).sum() / total)
    assert coder(x).auxk_loss == 0
    with pytest.raises(ValueError, match="'groupmax'"):
        csp.SparseCoderConfig(activation="groupmax")
    with pytest.raises(ValueError, match="aux_mask must be a bool tensor"):
        coder(x, dead_mask=dead.float())


# ---------------------------------------------------------------------------------------------------------------
# dictionary_learning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"])
def test_dictionary_learning_folders(name):
    folder = FIXTURES / f"dictionary_learning_{name}"
    want = expected(folder)
    sae = fusedsae.load(folder).eval()
    assert sae.cfg.metadata["dict_class"] == name
    torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
    torch.testing.assert_close(sae(want["x"]), want["forward"])


class _NotATensor:
    pass


def test_dictionary_learning_loader_never_unpickles_objects(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text('{"trainer": {"dict_class": "AutoEncoder"}}')
    torch.save({"encoder.weight": _NotATensor()}, folder / "ae.pt")
    with pytest.raises(SAEFormatError, match=r"torch.load\(weights_only=True\) can read"):
        fusedsae.load(folder)
    (folder / "config.json").write_text('{"trainer": {"dict_class": "AutoEncoderNew"}}')
    with pytest.raises(SAEFormatError, match="class 'AutoEncoderNew' is not supported"):
        fusedsae.load(folder)


# ---------------------------------------------------------------------------------------------------------------
# the SAELens layer on its own
# ---------------------------------------------------------------------------------------------------------------


def test_sae_lens_topk_training_step_matches_the_fixture():
    """One TopK step (rescale_acts_by_decoder_norm=True, 6 dead latents, AuxK) against SAELens's own numbers."""
    folder = FIXTURES / "saelens_train_topk"
    want = expected(folder)
    sae = csl.TrainingSAE.load_from_disk(folder)
    assert isinstance(sae, csl.TopKTrainingSAE) and sae.cfg.rescale_acts_by_decoder_norm
    out = sae.training_forward_pass(csl.TrainStepInput(want["x"], {}, want["dead"].bool(), 0, False))
    out.loss.backward()
    torch.testing.assert_close(out.loss, want["loss"])
    for key, value in out.losses.items():
        torch.testing.assert_close(value, want[f"loss.{key}"], msg=key)
    torch.testing.assert_close(out.feature_acts, want["feature_acts"])
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, want[f"grad.{name}"], msg=name)


def test_sae_lens_configs_metadata_dicts_and_files(tmp_path):
    cfg = csl.TopKSAEConfig(d_in=8, d_sae=16, k=3, metadata={"hook_name": "blocks.2.hook_resid_post"})
    assert cfg.architecture() == "topk" and cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert cfg.metadata.model_name is None and cfg.metadata["hook_name"] == "blocks.2.hook_resid_post"
    sae = csl.SAE(cfg)
    assert type(sae) is csl.TopKSAE and sae.cfg.d_sae == 16 and sae.device == torch.device("cpu")
    again = csl.SAE.from_dict(sae.cfg.to_dict())
    assert type(again) is csl.TopKSAE and again.cfg.k == 3
    weights_path, cfg_path = sae.save_model(tmp_path / "sae")
    assert weights_path.name == "sae_weights.safetensors" and cfg_path.name == "cfg.json"
    loaded = csl.SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), sae(x))
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    plain = fusedsae.load(tmp_path / "sae")  # and fusedsae's own layer reads it
    torch.testing.assert_close(plain(x), sae(x))
    bf16 = sae.to(torch.bfloat16)
    assert bf16.cfg.dtype == "bfloat16" and bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="normalize_activations='covariance_whitening' is not supported"):
        csl.StandardSAEConfig(d_in=4, d_sae=8, normalize_activations="covariance_whitening")
    with pytest.raises(ValueError, match="pre_act_loss_coefficient is not implemented"):
        csl.JumpReLUTrainingSAEConfig(d_in=4, d_sae=8, pre_act_loss_coefficient=3e-6)
    with pytest.raises(NotImplementedError, match="rescale_acts_by_decoder_norm=False"):
        sae.fold_W_dec_norm()


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_sae_lens_fold_error_term_hook_z(architecture):
    torch.manual_seed(1)
    sae = csl.SAE.from_dict({"architecture": architecture, "d_in": 12, "d_sae": 20, "dtype": "float64"})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
            if p.dim() == 2 and p.shape[0] == 20:
                p.mul_(torch.rand(20, 1, dtype=p.dtype) + 0.5)
    x = torch.randn(7, 12, dtype=torch.float64)
    before = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), before)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20, dtype=torch.float64))
    sae.use_error_term = True
    torch.testing.assert_close(sae(x), x)
    heads = csl.SAE.from_dict(
        {"architecture": architecture, "d_in": 12, "d_sae": 20, "reshape_activations": "hook_z", "dtype": "float64"}
    )
    z = torch.randn(3, 5, 4, 3, dtype=torch.float64)  # [batch, pos, n_heads, d_head]
    assert heads.encode(z).shape == (3, 5, 20) and heads(z).shape == z.shape


# ---------------------------------------------------------------------------------------------------------------
# training loops that differ only in the import
# ---------------------------------------------------------------------------------------------------------------


def sae_lens_style_training(lib: types.ModuleType, step_input_cls, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAELens 6.x training loop as its users write it; ``lib`` is ``sae_lens`` or ``fusedsae.compat.sae_lens``."""
    torch.manual_seed(seed)
    sae = lib.TopKTrainingSAE(lib.TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, dtype="float64"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[48:] = True
    losses = []
    for step in range(12):
        batch = data[step % 4]
        output = sae.training_forward_pass(
            step_input_cls(
                sae_in=batch, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
            )
        )
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.losses["mse_loss"].detach())
    return {**{k: v.detach() for k, v in sae.state_dict().items()}, "losses": torch.stack(losses)}


def test_sae_lens_style_training_loop_runs_unchanged():
    ours = sae_lens_style_training(csl, csl.TrainStepInput)
    assert ours["losses"][-4:].mean() < 0.9 * ours["losses"][:4].mean()


def sparsify_style_training(lib: types.ModuleType, seed: int = 0) -> dict[str, torch.Tensor]:
    """sparsify's own training step (SaeTrainer, adam): FVU + AuxK, parallel-gradient removal, renormalisation."""
    torch.manual_seed(seed)
    sae = lib.SparseCoder(16, lib.SparseCoderConfig(num_latents=64, k=4), dtype=torch.float64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[48:] = True
    fvus = []
    for step in range(12):
        x = data[step % 4]
        out = sae(x, dead_mask=dead)
        (out.fvu + 0.03 * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        fvus.append(out.fvu.detach())
    return {**{k: v.detach() for k, v in sae.state_dict().items()}, "fvu": torch.stack(fvus)}


def test_sparsify_style_training_loop_runs_unchanged():
    ours = sparsify_style_training(csp)
    assert ours["fvu"][-4:].mean() < 0.9 * ours["fvu"][:4].mean()


# ---------------------------------------------------------------------------------------------------------------
# live comparisons with the installed peers
# ---------------------------------------------------------------------------------------------------------------


def randomise_(module, threshold=(0.0, 0.4)):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
            if name == "W_dec":
                p.mul_(torch.rand(p.shape[0], 1, dtype=p.dtype) + 0.5)
            if name == "threshold":
                p.uniform_(*threshold)


LIVE_TRAINING = [
    ("StandardTrainingSAE", "StandardTrainingSAEConfig", {"lp_norm": 1.0}, {"l1": 0.3}),
    ("TopKTrainingSAE", "TopKTrainingSAEConfig", {"k": 4}, {}),
    ("TopKTrainingSAE", "TopKTrainingSAEConfig", {"k": 4, "rescale_acts_by_decoder_norm": False}, {}),
    ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig", {"k": 4}, {}),
    ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", {"jumprelu_bandwidth": 0.5}, {"l0": 0.2}),
    ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", {"jumprelu_sparsity_loss_mode": "tanh"}, {"l0": 0.2}),
]


@pytest.mark.parametrize("cls_name, cfg_name, kwargs, coefficients", LIVE_TRAINING)
def test_training_forward_pass_matches_installed_sae_lens(tmp_path, cls_name, cfg_name, kwargs, coefficients):
    sae_lens = peer("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    cfg = getattr(sae_lens, cfg_name)(d_in=12, d_sae=40, **kwargs)
    theirs = getattr(sae_lens, cls_name)(cfg).to(torch.float64)  # .to, not .double(): SAELens's dtype follows .to
    randomise_(theirs)
    ours = csl.TrainingSAE(cfg).to(torch.float64)  # built from SAELens's own config object
    assert type(ours).__name__ == cls_name
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(24, 12, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    a = theirs.training_forward_pass(TrainStepInput(x, coefficients, dead, 0, False))
    b = ours.training_forward_pass(csl.TrainStepInput(x, coefficients, dead, 0, False))
    assert a.losses.keys() == b.losses.keys()
    for key in a.losses:
        torch.testing.assert_close(b.losses[key], a.losses[key], msg=key)
    torch.testing.assert_close(b.feature_acts, a.feature_acts)
    torch.testing.assert_close(b.hidden_pre, a.hidden_pre.detach())
    a.loss.backward()
    b.loss.backward()
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        # SAELens keeps JumpReLU's threshold in float32 whatever the SAE's dtype, so compare it at that precision
        torch.testing.assert_close(mine[name].grad.to(p.grad.dtype), p.grad, msg=name)
    if cls_name == "BatchTopKTrainingSAE":
        torch.testing.assert_close(ours.topk_threshold, theirs.topk_threshold)
    # the inference form each writes (folded decoder norms, BatchTopK as JumpReLU) serves identically in SAELens
    theirs.save_inference_model(str(tmp_path / "theirs"))
    ours.save_inference_model(tmp_path / "ours")
    a, b = (sae_lens.SAE.load_from_disk(str(tmp_path / name)) for name in ("theirs", "ours"))
    assert type(a) is type(b)
    with torch.no_grad():
        torch.testing.assert_close(b.encode(x.float()), a.encode(x.float()))
        torch.testing.assert_close(b(x.float()), a(x.float()))


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize(
    "cls_name, cfg_name, kwargs",
    [
        ("StandardSAE", "StandardSAEConfig", {}),
        ("TopKSAE", "TopKSAEConfig", {"k": 4, "rescale_acts_by_decoder_norm": True}),
        ("JumpReLUSAE", "JumpReLUSAEConfig", {}),
        ("GatedSAE", "GatedSAEConfig", {}),
    ],
)
def test_inference_matches_installed_sae_lens_and_files_go_both_ways(tmp_path, cls_name, cfg_name, kwargs, normalize):
    sae_lens = peer("sae_lens")
    torch.manual_seed(1)
    cfg = getattr(sae_lens, cfg_name)(d_in=12, d_sae=40, normalize_activations=normalize, **kwargs)
    theirs = getattr(sae_lens, cls_name)(cfg).to(torch.float64)
    randomise_(theirs, threshold=(-0.3, 0.3))  # partly negative JumpReLU thresholds
    theirs.save_model(str(tmp_path / "theirs"))
    ours = csl.SAE.load_from_disk(tmp_path / "theirs")
    assert type(ours).__name__ == cls_name and ours.cfg.dtype == "float64"
    x = torch.randn(9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x))
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))
    ours.save_model(tmp_path / "ours")
    back = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x))


def test_sae_lens_style_training_loop_matches_installed_sae_lens():
    sae_lens = peer("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    theirs = sae_lens_style_training(sae_lens, TrainStepInput)
    ours = sae_lens_style_training(csl, csl.TrainStepInput)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, msg=name)


def test_sae_lens_own_trainer_drives_our_sae():
    """SAELens's SAETrainer (LR schedule, coefficient schedulers, dead-latent window, grad clipping, Adam) trains
    our TopKTrainingSAE to the same weights as its own."""
    sae_lens = peer("sae_lens")
    from sae_lens.config import SAETrainerConfig

    def train(lib):
        torch.manual_seed(0)
        sae = lib.TopKTrainingSAE(lib.TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4))
        data = torch.randn(12, 32, 16, generator=torch.Generator().manual_seed(1))
        cfg = SAETrainerConfig(
            total_training_samples=12 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3, dead_feature_window=3
        )
        return sae_lens.SAETrainer(cfg, sae, iter(list(data))).fit().state_dict()

    theirs, ours = train(sae_lens), train(csl)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, msg=name)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("options", [{}, {"multi_topk": True}, {"transcode": True}, {"skip_connection": True}])
def test_sparse_coder_matches_installed_sparsify(tmp_path, options, exact):
    sparsify = peer("sparsify")
    torch.manual_seed(2)
    cfg = sparsify.SparseCoderConfig(num_latents=40, k=4, **options)
    theirs = sparsify.SparseCoder(12, cfg, dtype=torch.float64)
    randomise_(theirs)
    ours = csp.SparseCoder(12, cfg, dtype=torch.float64)  # built from sparsify's own config object
    ours.exact_sparsify_gradients = exact
    ours.load_state_dict(theirs.state_dict())
    x, y = torch.randn(2, 24, 12, dtype=torch.float64)
    target = y if options.get("transcode") else None
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    a, b = theirs.encode(x), ours.encode(x)
    torch.testing.assert_close(b.pre_acts, a.pre_acts)
    torch.testing.assert_close(torch.sort(b.top_acts, -1).values, torch.sort(a.top_acts, -1).values)
    fa, fb = theirs(x, target, dead_mask=dead), ours(x, target, dead_mask=dead)
    for field in ("fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(fb, field), getattr(fa, field), msg=field)
    # with multi_topk sparsify returns the 4k reconstruction as sae_out (a reused variable); ours is the k one
    expected_out = theirs.decode(*a[:2]) + (x @ theirs.W_skip.mT if theirs.W_skip is not None else 0)
    torch.testing.assert_close(fb.sae_out, fa.sae_out if not options.get("multi_topk") else expected_out)
    (fa.fvu + fa.auxk_loss + fa.multi_topk_fvu).backward()
    (fb.fvu + fb.auxk_loss + fb.multi_topk_fvu).backward()
    mine = dict(ours.named_parameters())
    drops = not exact  # dead latents are given, so AuxK's gradient reaches the encoder (and b_dec through x - b_dec)
    encoder_side = (
        ("encoder.weight", "encoder.bias") if options.get("transcode") else ("encoder.weight", "encoder.bias", "b_dec")
    )
    for name, p in theirs.named_parameters():
        if drops and name in encoder_side:
            # sparsify's fused encoder drops the gradient reaching pre_acts (AuxK / Multi-TopK); ours keeps it
            assert not torch.allclose(mine[name].grad, p.grad), name
        else:
            torch.testing.assert_close(mine[name].grad, p.grad, msg=name)
    ours.save_to_disk(tmp_path / "ours")
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    torch.testing.assert_close(back(x, target).fvu, fb.fvu.detach())


def test_sparsify_style_training_loop_matches_installed_sparsify(monkeypatch):
    sparsify = peer("sparsify")
    monkeypatch.setattr(csp.SparseCoder, "exact_sparsify_gradients", True)
    theirs = sparsify_style_training(sparsify)
    ours = sparsify_style_training(csp)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the compat layers run on fusedsae's kernels
# ---------------------------------------------------------------------------------------------------------------


def _step_results(run):
    out = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(3)
        with fusedsae.backends.use(backend):
            out[backend] = run()
    return out["reference"], out["triton"]


def test_compat_layers_run_on_the_triton_kernels():
    """A TopK step of each layer (fused encoder + TopK + AuxK selection, sparse decoder) on the Triton backend
    (the interpreter on a CPU) agrees with the reference backend, values and gradients."""
    x = torch.randn(13, 10)
    dead = torch.zeros(33, dtype=torch.bool)
    dead[::4] = True

    def sae_lens_step():
        sae = csl.TopKTrainingSAE(csl.TopKTrainingSAEConfig(d_in=10, d_sae=33, k=3))
        out = sae.training_forward_pass(csl.TrainStepInput(x, {}, dead, 0, False))
        out.loss.backward()
        return [out.loss.detach(), out.feature_acts.detach(), *(p.grad for p in sae.parameters())]

    def sparsify_step():
        coder = csp.SparseCoder(10, csp.SparseCoderConfig(num_latents=33, k=3))
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss).backward()
        return [out.fvu.detach(), out.auxk_loss.detach(), *(p.grad for p in coder.parameters())]

    for step in (sae_lens_step, sparsify_step):
        reference, triton = _step_results(step)
        for a, b in zip(reference, triton):
            torch.testing.assert_close(b, a)  # float32 defaults: both accumulate in fp32, only the order differs


def test_the_plain_layer_points_peer_configs_to_the_compat_layers():
    with pytest.raises(TypeError, match=r"cfg must be a fusedsae.SAEConfig, got .*TopKSAEConfig; .*compat.sae_lens"):
        fusedsae.SparseAutoencoder(csl.TopKSAEConfig(d_in=4, d_sae=8, k=2))


def test_dictionary_learning_folders_match_installed_dictionary_learning(tmp_path):
    import json

    peer("dictionary_learning")
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    torch.manual_seed(5)
    x = torch.randn(17, 12)
    for ae in (AutoEncoder(12, 40), AutoEncoderTopK(12, 40, 4), BatchTopKSAE(12, 40, 4), JumpReluAutoEncoder(12, 40)):
        name = type(ae).__name__
        with torch.no_grad():
            for p in ae.parameters():
                p.add_(0.2 * torch.randn_like(p))
            if name == "BatchTopKSAE":
                ae.threshold.fill_(0.1)
            if name == "JumpReluAutoEncoder":
                ae.threshold.uniform_(-0.2, 0.3)
        folder = tmp_path / name
        folder.mkdir()
        torch.save(ae.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": name, "k": 4}}))
        ours = fusedsae.load(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), ae.encode(x), msg=name)
            torch.testing.assert_close(ours(x), ae(x), msg=name)
