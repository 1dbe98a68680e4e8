"""Matryoshka BatchTopK SAEs in SAELens's file formats (issue 13 item 1, files).

SAELens (>= 6.15) writes a Matryoshka BatchTopK SAE two ways: its training folder (``architecture:
"matryoshka_batchtopk"``, ``topk_threshold``, decoder norms not folded) and its inference folder (``jumprelu`` with
``metadata.training_architecture_details.matryoshka_widths``). The fixtures under tests/fixtures/saelens_matryoshka*
were written by SAELens 6.54.12 itself (tests/fixtures/make_fixtures.py), with its inference outputs and one training
step's losses; with sae_lens installed, the files fusedsae writes are also loaded by SAELens live.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fusedsae
from conftest import FIXTURES
from fusedsae import SAEFormatError
from fusedsae.compat import sae_lens as csl

MATRYOSHKA_FOLDERS = ["saelens_matryoshka", "saelens_matryoshka_train"]


def expected(folder):
    return load_file(str(folder / "expected.safetensors"))


@pytest.mark.parametrize("name", MATRYOSHKA_FOLDERS)
def test_sae_lens_matryoshka_folders_load_as_matryoshka_with_sae_lens_outputs(name):
    folder = FIXTURES / name
    want = expected(folder)
    sae = fusedsae.load(folder)
    assert sae.cfg.activation == "batchtopk" and sae.cfg.k == 3
    assert sae.cfg.matryoshka_widths == [4, 9, 16]
    assert "training_architecture" not in sae.cfg.metadata  # regenerated on save, not carried as user metadata
    sae.eval()  # the inference threshold: SAELens serves the same JumpReLU maths
    torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
    torch.testing.assert_close(sae(want["x"]), want["forward"])


@pytest.mark.parametrize("name", MATRYOSHKA_FOLDERS)
def test_matryoshka_training_losses_match_sae_lens(name):
    """One training step's reconstruction losses on SAELens's weights: ``mse_loss`` and every
    ``inner_mse_loss_<w>`` (the selection is BatchTopK over the whole batch in both, shared by the prefixes)."""
    folder = FIXTURES / name
    want = expected(folder)
    sae = fusedsae.load(folder).train()
    with torch.no_grad():
        out = sae.training_forward(want["x"])
    names = sorted(k.removeprefix("loss.") for k in want if k.startswith("loss."))
    assert names == ["inner_mse_loss_4", "inner_mse_loss_9", "mse_loss"]
    for key in names:
        torch.testing.assert_close(out.losses[key], want[f"loss.{key}"], msg=key)


def test_fusedsae_matryoshka_writes_sae_lens_training_architecture_and_reads_it_back(tmp_path):
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in=8, d_sae=13, activation="batchtopk", k=2, matryoshka_widths=[3, 7])
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        sae.b_enc.normal_(0, 0.1)
    sae.save(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu"
    assert raw["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    details = raw["metadata"]["training_architecture_details"]
    assert details["matryoshka_widths"] == [3, 7, 13] and details["k"] == 2
    # the SAELens keys alone are enough: without fusedsae's own config the folder still reads as Matryoshka
    del raw["metadata"]["fusedsae"]
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(raw))
    back = fusedsae.load(tmp_path / "m").eval()
    assert back.cfg.matryoshka_widths == [3, 7, 13] and back.cfg.k == 2
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), sae.eval()(x))
    back.save(tmp_path / "again")  # a second save regenerates the keys rather than duplicating stale ones
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again["metadata"]["training_architecture_details"] == details


def test_topk_matryoshka_keeps_its_widths_in_fusedsae_metadata_only(tmp_path):
    """SAELens has no Matryoshka TopK: such a folder is a plain SAELens topk folder, widths in metadata.fusedsae."""
    sae = fusedsae.SparseAutoencoder(d_in=6, d_sae=10, activation="topk", k=2, matryoshka_widths=[4])
    sae.save(tmp_path / "t")
    raw = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert raw["architecture"] == "topk" and "training_architecture" not in raw["metadata"]
    assert fusedsae.load(tmp_path / "t").cfg.matryoshka_widths == [4, 10]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda raw: raw.update(k=2.5), "'k'"),
        (lambda raw: raw.pop("matryoshka_widths"), "'matryoshka_widths'"),
        (lambda raw: raw.update(matryoshka_widths=[9, 4, 16]), "matryoshka_widths must increase"),
    ],
)
def test_broken_sae_lens_matryoshka_config_is_named(tmp_path, edit, field):
    folder = tmp_path / "broken"
    folder.mkdir()
    source = FIXTURES / "saelens_matryoshka_train"
    raw = json.loads((source / "cfg.json").read_text())
    edit(raw)
    (folder / "cfg.json").write_text(json.dumps(raw))
    (folder / "sae_weights.safetensors").write_bytes((source / "sae_weights.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match=field) as info:
        fusedsae.load(folder)
    assert "cfg.json" in str(info.value)


def test_inference_matryoshka_folder_without_details_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    source = FIXTURES / "saelens_matryoshka"
    raw = json.loads((source / "cfg.json").read_text())
    raw["metadata"]["training_architecture_details"] = "widths"
    (folder / "cfg.json").write_text(json.dumps(raw))
    (folder / "sae_weights.safetensors").write_bytes((source / "sae_weights.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match="training_architecture_details"):
        fusedsae.load(folder)


def test_sae_lens_loads_fusedsae_matryoshka_with_identical_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens not installed (the fixtures cover reading in CI)")
    torch.manual_seed(1)
    ours = fusedsae.SparseAutoencoder(d_in=8, d_sae=12, activation="batchtopk", k=3, matryoshka_widths=[2, 5])
    with torch.no_grad():
        ours.threshold.fill_(0.1)
        ours.b_enc.normal_(0, 0.2)
    ours.save(tmp_path / "m")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "m"))
    details = theirs.cfg.metadata.training_architecture_details
    assert theirs.cfg.metadata.training_architecture == "matryoshka_batchtopk"
    assert details["matryoshka_widths"] == [2, 5, 12]
    x = torch.randn(7, 8)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs(x), ours(x))


def test_compat_layer_serves_sae_lens_matryoshka_folders_as_sae_lens_does():
    """``csl.SAE.load_from_disk`` on either folder gives the JumpReLU SAE SAELens serves for inference."""
    for name in MATRYOSHKA_FOLDERS:
        folder = FIXTURES / name
        want = expected(folder)
        sae = csl.SAE.load_from_disk(folder)
        assert isinstance(sae, csl.JumpReLUSAE)
        torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
        torch.testing.assert_close(sae(want["x"]), want["forward"])


def test_compat_matryoshka_training_sae_reads_writes_and_trains_as_sae_lens(tmp_path):
    """``csl.MatryoshkaBatchTopKTrainingSAE``: SAELens's training folder in, its losses on SAELens's weights, and
    both of SAELens's folder forms out, each read back by ``fusedsae.load`` as the same Matryoshka SAE."""
    from fusedsae.compat.sae_lens import TrainStepInput

    folder = FIXTURES / "saelens_matryoshka_train"
    want = expected(folder)
    sae = csl.TrainingSAE.load_from_disk(folder)
    assert isinstance(sae, csl.MatryoshkaBatchTopKTrainingSAE) and sae.cfg.matryoshka_widths == [4, 9, 16]
    sae.save_model(tmp_path / "train")
    raw = json.loads((tmp_path / "train" / "cfg.json").read_text())
    assert raw["architecture"] == "matryoshka_batchtopk" and raw["matryoshka_widths"] == [4, 9, 16]
    sae.save_inference_model(tmp_path / "inference")
    ours = fusedsae.load(folder).eval()
    for form in ("train", "inference"):
        back = fusedsae.load(tmp_path / form).eval()
        assert back.cfg.matryoshka_widths == [4, 9, 16] and back.cfg.k == 3, form
        torch.testing.assert_close(back(want["x"]), ours(want["x"]), msg=form)
    assert sae.to_fusedsae().cfg.matryoshka_widths == [4, 9, 16]
    # after the files (a training step moves the BatchTopK threshold's EMA)
    out = sae.training_forward_pass(TrainStepInput(want["x"], {}, None, 0, False))
    for key in ("mse_loss", "inner_mse_loss_4", "inner_mse_loss_9"):
        torch.testing.assert_close(out.losses[key], want[f"loss.{key}"], msg=key)
    out.loss.backward()  # the inner losses train the encoder through the shared BatchTopK activations
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="use_matryoshka_aux_loss"):
        csl.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=4, d_sae=8, k=2, matryoshka_widths=[2], use_matryoshka_aux_loss=True
        )
    assert csl.MatryoshkaBatchTopKTrainingSAEConfig(d_in=4, d_sae=8, k=2, matryoshka_widths=[2]).matryoshka_widths == [
        2,
        8,
    ]


def test_sae_lens_reads_the_compat_matryoshka_training_folder(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens not installed (the fixtures cover reading in CI)")
    from sae_lens.saes.sae import TrainStepInput as TheirInput

    from fusedsae.compat.sae_lens import TrainStepInput

    torch.manual_seed(2)
    cfg = csl.MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=12, k=2, matryoshka_widths=[3, 7])
    ours = csl.MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ours.save_model(tmp_path / "m")
    theirs = sae_lens.TrainingSAE.load_from_disk(str(tmp_path / "m"))
    assert type(theirs).__name__ == "MatryoshkaBatchTopKTrainingSAE"
    x = torch.randn(10, 8)
    mine = ours.training_forward_pass(TrainStepInput(x, {}, None, 0, False)).losses
    their = theirs.training_forward_pass(TheirInput(x, {}, None, 0, False)).losses
    for key in ("mse_loss", "inner_mse_loss_3", "inner_mse_loss_7"):
        torch.testing.assert_close(mine[key], their[key], msg=key)
