"""Drop-in layers for code written against other SAE libraries: change one import, keep the rest.

- :mod:`fusedsae.compat.sae_lens`: SAELens 6.x's ``SAE`` classes, config objects and training-step types.
- :mod:`fusedsae.compat.sparsify`: sparsify 1.3's ``SparseCoder`` (``Sae``), its config and output tuples.

Both compute through :mod:`fusedsae.functional` (so the fused Triton/CUDA kernels run where they can) and read and
write the peers' own folder formats. What each covers, and what it does not, is in the README ("Drop-in
compatibility") and in each module's docstring.
"""
