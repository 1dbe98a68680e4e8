"""The encoder's Hopper configurations (CANDIDATE_CONFIGS, TMA and pointer operands, the split epilogue) and the
launch-grid limits, through the interpreter with the GPU tile sizes; compared with the reference. And every kernel
launch compiled for sm_90 at the DESIGN shapes (tests/compile_for_gpu.py), without a GPU."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

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
        (40, False, 64, 0),  # k = 64: as many buckets as a half tile has columns
        (40, False, 20, 100),  # AuxK with 128 buckets, one per column of the tile
        (40, False, 2, 1),  # k = 2, aux_k = 1: buckets of many columns
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


@pytest.mark.parametrize(
    ("split", "k", "aux_k"),
    [
        (4, 64, 100),  # 32-column quarters: k = 64's buckets in two slices, AuxK's 128 in four
        (4, 20, 128),  # one column per bucket for TopK (KP = 32), four AuxK slices
        (2, 2, 1),  # halves: buckets of 32 and 64 columns
        (1, 5, 3),  # the whole tile at once
    ],
)
def test_fused_filter_splits_at_any_bound_width(split, k, aux_k):
    # The fused encoder's filter with tile parts narrower than its bounds' buckets (the bucket maxima in slices),
    # launched directly: the launcher halves the split until a part holds the bound's buckets, so it does not reach
    # these cases at the interpreter's tile sizes. Each row's candidates must hold its top k (and top aux_k among
    # the mask) in the reference's order. Integers make the sums exact and ties exact, broken by the lower index;
    # the buffers hold every column, so nothing overflows. The first tile's first 64 columns carry large biases:
    # the bucket maxima of the slices holding them are far above the others', so a bound taken over some slices
    # only would drop the rest of the top k.
    import triton

    from fusedsae.kernels import encoder as kernels

    n, d_in, d_sae, block_n = 20, 8, 2000, 128
    W_enc = torch.randint(-8, 9, (d_in, d_sae), device=DEVICE).float()
    b_enc = torch.randint(-8, 9, (d_sae,), device=DEVICE).float()
    b_enc[:64] += 1000
    x = torch.randint(-8, 9, (n, d_in), device=DEVICE).float()
    mask = aux_mask_for(d_sae, aux_k)
    tiles = triton.cdiv(d_sae, block_n)
    cap = tiles * block_n
    cand, aux_cand = (torch.empty(n, 1, cap, dtype=torch.int64, device=DEVICE) for _ in range(2))
    count, aux_count = (torch.empty(n, 1, dtype=torch.int32, device=DEVICE) for _ in range(2))
    kernels._topk_encode_fwd_kernel[(triton.cdiv(n, 16),)](
        x, W_enc, b_enc, mask.view(torch.uint8), cand, count, aux_cand, aux_count,
        n, d_in, d_sae, tiles, 1, cap, cap, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        HAS_AUX=True, USE_TMA=False, W_T=False, UPCAST_DOT=False, DOT_PRECISION="ieee",
        KP=triton.next_power_of_2(k), KP_AUX=triton.next_power_of_2(aux_k),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=16, EPILOGUE_SPLIT=split,
    )  # fmt: skip
    expected = reference.topk_encode(x, W_enc, b_enc, None, k, aux_k, mask)

    def best(keys, counts, m):
        """Column indices of each row's m largest keys, in key order (the low 32 bits hold 0xFFFFFFFF - column)."""
        assert (counts[:, 0] >= m).all() and (counts[:, 0] <= cap).all()
        rows = [keys[r, 0, : counts[r, 0]].topk(m).values for r in range(n)]
        return 0xFFFFFFFF - (torch.stack(rows) & 0xFFFFFFFF)

    assert torch.equal(best(cand, count, k), expected[1])
    assert torch.equal(best(aux_cand, aux_count, aux_k), expected[3])


def test_encoder_config_is_chosen_by_name(monkeypatch):
    assert tt.encoder_config() == (tt.DEFAULT_ENCODER_CONFIG, tt.CANDIDATE_CONFIGS[tt.DEFAULT_ENCODER_CONFIG])
    assert tt.encoder_config(torch.bfloat16, 64)[0] == tt.DEFAULT_ENCODER_CONFIG
    assert tt.encoder_config(torch.bfloat16, 128)[0] == tt.encoder_config(torch.float32, 32)[0] == "m64n128"
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


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="with a GPU every other test compiles and runs the kernels")
def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter accepts code the compiler rejects (tl.dot shapes, layouts, runtime loop bounds), so every
    kernel launch the launchers make at the DESIGN shapes' real arguments is also compiled to an sm_90 cubin with
    triton's bundled ptxas, without a GPU (bfloat16 here; the script does all dtypes). Runs under the GPU
    machines' triton 3.6 and under the newest triton (scripts/newest_triton.sh)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas for NVIDIA targets")
    script = Path(__file__).resolve().parent / "compile_for_gpu.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(script), "--dtypes", "bfloat16", "--report", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    # non-zero: a launch failed to compile, ptxas failed, or a kernel of fusedsae.kernels was never launched
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(report.with_suffix(".json").read_text())["runs"]["current"]["rows"]
    fused = [row for row in rows if row["kernel"] == "_topk_encode_fwd_kernel"]
    assert fused and all(row["mma"] == "wgmma" for row in fused), [(r["cases"], r["mma"]) for r in fused]
    # the hot path at 768 -> 32768, k = 32: two resident blocks, so one block's epilogue runs under the other's MMAs
    hot = [row for row in fused if "768->32768 k=32 bfloat16 topk" in row["cases"]]
    assert len(hot) == 1 and hot[0]["blocks_per_sm"] >= 2, hot


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
