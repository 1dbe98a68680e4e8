"""The ``triton`` backend: launchers (reshape, allocate, choose blocks and grid, launch; no autograd) for the
kernels in :mod:`fusedsae.kernels`, registered for every op in :data:`fusedsae.backends.OPS`.

One module per kernel module, each launcher registered where it is defined, next to its ``supports_<op>`` check:

* :mod:`.encoder` (``kernels/encoder.py``): ``encode_dense``, ``topk_encode``, ``batchtopk_encode``, and the
  fused encoder's tile configurations (:data:`CANDIDATE_CONFIGS`);
* :mod:`.topk` (``kernels/topk.py``): ``row_topk``, and the key selection the encoder shares;
* :mod:`.sparse` (``kernels/sparse.py``): ``sparse_decode``, ``sparse_decode_backward``, ``sparse_encode_backward``;
* :mod:`.jumprelu` (``kernels/jumprelu.py``): ``jumprelu``, ``step``, ``jumprelu_backward``, ``step_backward``;
* :mod:`.heads` (``kernels/heads.py``): ``head_partial_sums`` (and ``encode_head_partials``, no op);
* :mod:`.matryoshka` (``kernels/matryoshka.py``): ``matryoshka_decode_loss``, ``matryoshka_decode_loss_backward``.

:mod:`.launch` holds what they share (availability, dtype refusals, grid limits, GPU or interpreter block sizes,
the determinism switch); :mod:`fusedsae.backends.common` the decisions the ``cuda`` backend makes too.

It runs CUDA tensors. Under ``TRITON_INTERPRET=1`` (which triton 3.6 reads when ``@triton.jit`` decorates a
kernel, so it must be set before :mod:`fusedsae.kernels` is first imported) the kernels run in Triton's
interpreter and an explicit ``FUSEDSAE_BACKEND=triton`` also takes CPU tensors: that is how CI checks every kernel
without a GPU. The dispatcher imports this package lazily, so importing fusedsae never imports triton; without
triton the backend is defined (and says why it cannot run) but no launcher module is imported.

Determinism: the per-latent gradient sums are bitwise reproducible unless :func:`set_deterministic` is off (see
:mod:`.sparse`); every other kernel is deterministic.
"""

from __future__ import annotations

from fusedsae.backends import define_backend

from .launch import (
    IMPORT_ERROR,
    INTERPRETED,
    assume_gpu,
    availability,
    checked_grid,
    deterministic,
    set_deterministic,
)

backend = define_backend(
    "triton",
    availability,
    devices=("cuda",),
    explicit_devices=("cuda", "cpu") if INTERPRETED else ("cuda",),
)

__all__ = [
    "IMPORT_ERROR",
    "INTERPRETED",
    "assume_gpu",
    "availability",
    "backend",
    "checked_grid",
    "deterministic",
    "set_deterministic",
]

# The launcher modules register their ops with the backend defined above, so they are imported after it (and only
# where triton is installed: they import the kernels).
if IMPORT_ERROR is None:
    from . import encoder, heads, jumprelu, matryoshka, sparse, topk
    from .encoder import (
        CANDIDATE_CONFIGS,
        DEFAULT_ENCODER_CONFIG,
        WIDE_ENCODER_CONFIG,
        EncoderConfig,
        encoder_config,
        set_encoder_config,
    )
    from .topk import FUSED_K_MAX, KEY_NONE

    __all__ += [
        "CANDIDATE_CONFIGS",
        "DEFAULT_ENCODER_CONFIG",
        "FUSED_K_MAX",
        "KEY_NONE",
        "WIDE_ENCODER_CONFIG",
        "EncoderConfig",
        "encoder",
        "encoder_config",
        "heads",
        "jumprelu",
        "matryoshka",
        "set_encoder_config",
        "sparse",
        "topk",
    ]
