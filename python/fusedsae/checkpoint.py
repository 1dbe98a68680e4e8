"""Training checkpoints that survive a crash, and are read without unpickling anything.

A checkpoint is a folder ``<run>/checkpoints/step-<step>/`` of safetensors files (tensors) and JSON files (the
rest), plus ``manifest.json`` listing every file with its size and SHA-256. It is written in a hidden temporary
folder and renamed into place once complete, so a crash mid-write leaves the previous checkpoints intact and at
worst a ``.step-*.tmp-*`` folder that the next run removes. On resume each candidate is verified against its
manifest; a truncated or altered one is reported and skipped in favour of the newest intact one.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusedsae.formats import read_json, read_safetensors, replace_dir, sha256_file, write_json, write_safetensors

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, corrupt, or not a fusedsae checkpoint."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def write_checkpoint(run_dir: str | Path, step: int, contents: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``contents`` (``name.safetensors -> {key: Tensor}``, ``name.json -> JSON data``) as the checkpoint of
    ``step``, atomically, then deletes all but the newest ``keep`` checkpoints."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        manifest: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "files": {}}
        for name, content in contents.items():
            path = tmp / name
            if name.endswith(".safetensors"):
                write_safetensors(path, content)
            elif name.endswith(".json"):
                write_json(path, content)
            else:
                raise ValueError(f"checkpoint file {name!r} must end in .safetensors or .json")
            manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        write_json(tmp / MANIFEST, manifest)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Deletes temporary folders left by a crash during a checkpoint write; returns what it removed."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Checks every file of a checkpoint against its manifest; returns the manifest or raises CheckpointError."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a fusedsae checkpoint, or an incomplete one")
    try:
        manifest = read_json(folder / MANIFEST)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder}/{MANIFEST} is not a fusedsae checkpoint manifest (format {FORMAT_VERSION})")
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{folder}: {name} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its SHA-256 in the manifest (corrupt)")
    return manifest


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verifies and reads a checkpoint: ``{file name: {key: Tensor} or JSON data}``."""
    folder = Path(path)
    manifest = verify_checkpoint(folder)
    out: dict[str, Any] = {}
    for name in manifest["files"]:
        try:
            out[name] = read_safetensors(folder / name) if name.endswith(".safetensors") else read_json(folder / name)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that verifies; broken newer ones are reported with a warning and skipped."""
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as exc:
            warnings.warn(f"skipping unusable checkpoint: {exc}", stacklevel=2)
            continue
        return folder
    return None


# ---------------------------------------------------------------------------------------------------------------
# optimizer and RNG state as tensors + JSON (no pickle)
# ---------------------------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON (groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = state
    return out


def set_rng_state(states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda.{i}"] for i in range(len(states)) if f"cuda.{i}" in states]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
