"""Triton kernels of fusedsae (installed as ``fusedsae.kernels``): ``@triton.jit`` functions only; their launchers
live in :mod:`fusedsae.backends.triton`."""
