"""The encoder's Hopper configurations (CANDIDATE_CONFIGS, TMA and pointer operands, the split epilogue) and the
launch-grid limits, through the interpreter with the GPU tile sizes; compared with the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import naive
from conftest import assert_close_lowp
from fusedsae import backends, reference
from test_triton import (  # noqa: F401  (_fast_interpreted_sort: the module-wide interpreter speed-up fixture)
    DEVICE,
    GPU,
    _fast_interpreted_sort,
    assert_same_topk,
    assert_topk_like_reference,
    aux_mask_for,
    make_weights,
    on_triton,
    randn,
    rounding_tolerance,
    tt,
)

pytestmark = pytest.mark.skipif(
    not backends.report()["triton"]["available"], reason=f"triton backend: {backends.report()['triton']['reason']}"
)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers' GPU tiles and grids, run by the interpreter (2 SMs, so that splits and persistent loops
    occur at test sizes)."""
    if GPU:
        pytest.skip("on a GPU the other tests run the GPU configurations compiled")
    tt.assume_gpu(2)
    yield
    tt.assume_gpu(None)
    tt.set_encoder_config(None)


def check_topk(x, W_enc, b_enc, b_dec, k, aux_k, name):
    """Our fused selection against the reference: exact up to near-ties closer than the two float32 GEMMs'
    rounding (70 rows x 300 latents hold some)."""
    mask = aux_mask_for(W_enc.shape[1], aux_k) if aux_k else None
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    exact = naive.pre(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    tol = rounding_tolerance(x, W_enc, b_dec)
    assert_topk_like_reference(ours[0], ours[1], expected[1], exact, tol, f"{name} topk")
    if aux_k:
        dead = exact.masked_fill(~mask, float("-inf"))
        assert_topk_like_reference(ours[2], ours[3], expected[3], dead, tol, f"{name} auxk")


@pytest.mark.parametrize("name", sorted(tt.CANDIDATE_CONFIGS))
def test_every_candidate_config_selects_like_the_reference(gpu_tiles, name):
    # 70 rows: a partial last row block; d_sae 300: a partial last tile and splits ending past it; rows of
    # 160 B: TMA descriptors where the config asks for them.
    tt.set_encoder_config(name)
    x = randn(70, 40)
    W_enc, b_enc, b_dec, _ = make_weights(40, 300)
    check_topk(x, W_enc, b_enc, b_dec, 5, 3, name)


@pytest.mark.parametrize(
    ("d_in", "transposed", "k", "aux_k"),
    [
        (40, True, 5, 3),  # W_enc as a transposed view: descriptors of W_enc^T (W_T)
        (13, False, 1, 0),  # rows of 52 B: pointer loads; k = 1
        (40, False, 64, 0),  # k = 64: the quarter-tile epilogue falls back to halves (one column per bucket)
    ],
)
def test_default_config_layouts_and_k(gpu_tiles, d_in, transposed, k, aux_k):
    x = randn(70, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, 300)
    if transposed:
        W_enc = W_enc.t().contiguous().t()
    check_topk(x, W_enc, b_enc, b_dec, k, aux_k, tt.DEFAULT_ENCODER_CONFIG)


def test_split_epilogue_ties_and_all_negative_rows(gpu_tiles):
    # Small integers make exact ties; the quarter-tile epilogue must still break them by the lower index, and
    # rows whose pre-activations are all negative still select k latents.
    tt.set_encoder_config("m64n128")
    d_in, d_sae = 8, 260
    W_enc = torch.randint(-2, 3, (d_in, d_sae), device=DEVICE).float()
    b_enc = torch.randint(-1, 2, (d_sae,), device=DEVICE).float()
    x = torch.randint(-2, 3, (66, d_in), device=DEVICE).float()
    x[1] = 0
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, None, 20, 0, None)
        negative = torch.ops.fusedsae.topk_encode(x[:3], 0 * W_enc, -1 - torch.rand(d_sae), None, 7, 0, None)
    assert_same_topk(ours, reference.topk_encode(x, W_enc, b_enc, None, 20, 0, None))
    assert (negative[0] < 0).all() and negative[1].shape == (3, 7)


def test_encoder_config_is_chosen_by_name(monkeypatch):
    assert tt.encoder_config() == (tt.DEFAULT_ENCODER_CONFIG, tt.CANDIDATE_CONFIGS[tt.DEFAULT_ENCODER_CONFIG])
    assert tt.encoder_config(torch.bfloat16, 64)[0] == tt.encoder_config(torch.float32, 32)[0] == "m64n128"
    monkeypatch.setenv("FUSEDSAE_ENCODER_CONFIG", "m64n256")
    assert tt.encoder_config()[0] == "m64n256"
    tt.set_encoder_config("m128n128")
    try:
        assert tt.encoder_config()[0] == "m128n128"  # the explicit choice wins over the environment
    finally:
        tt.set_encoder_config(None)
    monkeypatch.setenv("FUSEDSAE_ENCODER_CONFIG", "m999")
    with pytest.raises(ValueError, match="FUSEDSAE_ENCODER_CONFIG='m999' is not an encoder config; choose one of"):
        tt.encoder_config()
    with pytest.raises(ValueError, match="unknown encoder config 'nope'"):
        tt.set_encoder_config("nope")


# ---------------------------------------------------------------------------------------------------------------
# grid limits
# ---------------------------------------------------------------------------------------------------------------


def test_grids_at_the_hardware_limits_launch_and_beyond_them_refuse():
    assert tt.checked_grid(2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match="needs 65536 programs on grid axis y, above the GPU's limit of 65535"):
        tt.checked_grid(1, 65536)
    with pytest.raises(ValueError, match="grid axis x"):
        tt.checked_grid(2**31)
    # the tiled axes: d_sae = 2**31 - 1 in 256-wide column blocks needs 129 launches of at most 65535 blocks
    blocks = -(-(2**31 - 1) // 256)
    chunks = tt.launch.axis_chunks(blocks, axis=1)
    assert all(0 < stop - start <= 65535 for start, stop in chunks)
    assert chunks[0][0] == 0 and chunks[-1][1] == blocks and len(chunks) == 129
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))


def test_launches_tile_axes_past_a_limit(monkeypatch):
    # The limits lowered to 2 blocks on y and z, so that the tiled launches happen at test sizes: JumpReLU
    # (column blocks on y) and the keys of the two-pass selection (row blocks on y) give the reference's results.
    monkeypatch.setattr(tt.launch, "GRID_LIMITS", (2**31 - 1, 2, 2))
    pre = randn(40, 150)
    threshold = torch.rand(150, device=DEVICE) - 0.5
    with on_triton():
        out = tt.jumprelu.jumprelu(pre, threshold)
        step = tt.jumprelu.step(pre, threshold)
        values, indices = torch.ops.fusedsae.row_topk(pre, 130)  # k > FUSED_K_MAX: keys + torch.topk
    torch.testing.assert_close(out, reference.jumprelu(pre, threshold), rtol=0, atol=0)
    torch.testing.assert_close(step, reference.step(pre, threshold), rtol=0, atol=0)
    expected_values, expected_indices = reference.row_topk(pre, 130)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    # an axis that is not tiled refuses in one line
    with on_triton(), pytest.raises(ValueError, match="above the GPU's limit of 2"):
        torch.ops.fusedsae.sparse_decode(randn(3, 40), torch.zeros(3, 40, dtype=torch.int64), randn(150, 600), None)


# ---------------------------------------------------------------------------------------------------------------
# per-head partial sums from the encoder's K loop
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_heads", "d_head", "m"), [(37, 3, 24, 21), (5, 1, 16, 1), (70, 4, 10, 40)])
@pytest.mark.parametrize("center", [True, False])
def test_encoder_head_partials_match_the_reference(n, n_heads, d_head, m, center):
    # d_head 24 and 10: heads end inside a 16-wide K step; m = 1; repeated features
    d_in, d_sae = n_heads * d_head, 50
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    b = b_dec if center else None
    features = torch.randint(0, d_sae, (m,), device=DEVICE)
    with on_triton():
        pre, parts = tt.heads.encode_head_partials(x, W_enc, b_enc, b, features, n_heads)
        via_op = torch.ops.fusedsae.head_partial_sums(x, W_enc, b, features.expand(n, -1), n_heads)
    expected_pre, expected_parts = reference.encode_head_partials(x, W_enc, b_enc, b, features, n_heads)
    torch.testing.assert_close(parts, expected_parts)
    torch.testing.assert_close(pre, expected_pre)
    # the same numbers as the gather route's reference, and as the pre-activation at those features
    gather = reference.head_partial_sums(x, W_enc, b, features.expand(n, -1).contiguous(), n_heads)
    torch.testing.assert_close(via_op, gather)
    if center:
        torch.testing.assert_close(pre, reference.encode_pre(x, W_enc, b_enc, b_dec)[:, features])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_head_partials_low_precision(dtype):
    x, (W_enc, b_enc, b_dec, _) = randn(33, 48).to(dtype), [t.to(dtype) for t in make_weights(48, 40)]
    features = torch.tensor([3, 0, 39, 3], device=DEVICE)
    with on_triton():
        pre, parts = tt.heads.encode_head_partials(x, W_enc, b_enc, b_dec, features, 3)
    exact_pre, exact_parts = reference.encode_head_partials(
        x.double(), W_enc.double(), b_enc.double(), b_dec.double(), features, 3
    )
    base_pre, base_parts = reference.encode_head_partials(x, W_enc, b_enc, b_dec, features, 3)
    assert_close_lowp(parts, base_parts, exact_parts, "parts")
    assert_close_lowp(pre, base_pre, exact_pre, "pre")


def test_encoder_head_partials_refuse_what_they_cannot_take():
    x = randn(4, 12)
    W_enc, b_enc, b_dec, _ = make_weights(12, 20)
    with pytest.raises(ValueError, match="n_heads=5 must divide d_in=12"):
        tt.heads.encode_head_partials(x, W_enc, b_enc, b_dec, torch.tensor([1, 2]), 5)
