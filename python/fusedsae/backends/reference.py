"""The ``reference`` backend: :mod:`fusedsae.reference` serves every op, on any device."""

from __future__ import annotations

from fusedsae import reference
from fusedsae.backends import OPS, define_backend, register

backend = define_backend(
    "reference",
    lambda: (True, "pure PyTorch; runs every op on any device"),
    devices=("cpu", "cuda", "mps", "meta", "xpu"),
)

for _op in OPS:
    register("reference", _op)(getattr(reference, _op))
