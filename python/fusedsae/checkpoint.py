"""Training checkpoints that survive a crash, and are read without unpickling anything; run folders that keep
their identity.

A checkpoint is a folder ``<run>/checkpoints/step-<step>/`` of safetensors files (tensors) and JSON files (the
rest), plus ``manifest.json`` listing every file with its size and SHA-256, the run id that wrote it, and a SHA-256
of the manifest itself (so an edited or bit-flipped manifest is caught too). It is written in a hidden temporary
folder and renamed into place once complete, so a crash mid-write leaves the previous checkpoints intact and at
worst a ``.step-*.tmp-*`` folder that the next run removes. On resume each candidate is verified field by field
against its manifest; a truncated, altered or foreign one is reported and skipped in favour of the newest intact
one, and when none is usable :class:`CheckpointError` names every file and its problem.

A run folder belongs to one run (a random run id, in ``run_config.json``, ``summary.json`` and every checkpoint
manifest): :func:`claim_run_dir` refuses a folder holding another run unless asked to replace it, and
:class:`RunLock` keeps a second trainer out while one writes.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusedsae.formats import (
    is_temporary,
    manifest_digest,
    read_json,
    read_safetensors,
    replace_dir,
    sha256_file,
    write_json,
    write_safetensors,
)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
# 2: the manifest carries the run id and its own SHA-256 (1 had neither).
FORMAT_VERSION = 2
LOCK_FILE = ".lock"
# What a run writes into its folder (besides run_config.json, the CLI's): removed by --overwrite, and the evidence
# that a folder holds a run.
RUN_FILES = ("checkpoints", "sae", "summary.json", "metrics.jsonl")
RUN_CONFIG = "run_config.json"
_HEX = set("0123456789abcdef")


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, corrupt, not a fusedsae checkpoint, or not this run's."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint belongs to another run, or to settings that would change the result: older checkpoints of the
    same folder are no better, so resuming stops instead of falling back."""


class RunFolderError(ValueError):
    """A run folder holds another run, or another trainer is writing it."""


def new_run_id() -> str:
    """A fresh random run id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_of(path: Path) -> int | None:
    """The step in a checkpoint folder's name ``step-<digits>``, or None for any other name."""
    digits = path.name.removeprefix("step-")
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def write_checkpoint(
    run_dir: str | Path, step: int, contents: dict[str, Any], keep: int = 2, run_id: str | None = None
) -> Path:
    """Writes ``contents`` (``name.safetensors -> {key: Tensor}``, ``name.json -> JSON data``) as the checkpoint of
    ``step`` of run ``run_id``, atomically, then deletes this run's checkpoints older than the newest ``keep``
    (see :func:`prune_checkpoints`)."""
    tmp = begin_checkpoint(run_dir, step)
    try:
        for name, content in contents.items():
            path = tmp / name
            if name.endswith(".safetensors"):
                write_safetensors(path, content)
            elif name.endswith(".json"):
                write_json(path, content)
            else:
                raise ValueError(f"checkpoint file {name!r} must end in .safetensors or .json")
        return seal_checkpoint(run_dir, step, tmp, list(contents), keep, run_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A new hidden temporary folder in which to write the checkpoint of ``step`` (:func:`seal_checkpoint` then
    makes it the checkpoint; a crash before that leaves a folder :func:`remove_partial` deletes)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".step-{step:09d}.tmp-", dir=root))


def seal_checkpoint(
    run_dir: str | Path, step: int, tmp: Path, names: list[str], keep: int = 2, run_id: str | None = None
) -> Path:
    """Makes the complete folder ``tmp`` (holding the files ``names``, written by :func:`write_checkpoint` or by
    the ranks of a latent-sharded run) the checkpoint of ``step``: writes its manifest (each file's size and
    SHA-256, read back in blocks), renames it into place and prunes older checkpoints (see
    :func:`write_checkpoint`). The caller removes ``tmp`` if this raises."""
    final = checkpoint_root(run_dir) / f"step-{step:09d}"
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "run_id": run_id, "files": {}}
    for name in names:
        path = tmp / name
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json(tmp / MANIFEST, manifest)
    replace_dir(tmp, final)
    prune_checkpoints(run_dir, run_id, keep, step)
    return final


def prune_checkpoints(run_dir: str | Path, run_id: str | None, keep: int, newest_step: int) -> list[Path]:
    """Deletes run ``run_id``'s checkpoints up to ``newest_step`` except the newest ``keep`` of them.

    Checkpoints of another run, unreadable ones and ones after ``newest_step`` (left by a run that resumed from an
    older checkpoint; replaced when the run gets there) are never counted, so they cannot push this run's own
    newest checkpoints out (keeping the names that sort last once deleted every new checkpoint of a second run).
    """
    if keep <= 0:
        return []
    mine = []
    for folder in list_checkpoints(run_dir):
        step = step_of(folder)
        if step is None or step > newest_step:
            continue
        try:
            owner = read_manifest(folder).get("run_id")
        except CheckpointError:
            continue
        if owner == run_id:
            mine.append(folder)
    removed = mine[:-keep]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and step_of(p) is not None)


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Deletes what a crash during a write leaves (temporary checkpoint and SAE folders, temporary files) in the run
    folder and its ``checkpoints/``; returns what it removed. Call it only while holding the folder's lock."""
    removed = []
    for root in (Path(run_dir), checkpoint_root(run_dir)):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if is_temporary(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _field_error(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: field {field!r} {problem}; the checkpoint was edited or damaged (resume falls back to an older one)"
    )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads and validates a checkpoint's ``manifest.json`` field by field (not the files it lists)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a fusedsae checkpoint, or an incomplete one")
    manifest = read_json(path, error=CheckpointError)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format' is {manifest.get('format')!r}, this fusedsae reads checkpoint format "
            f"{FORMAT_VERSION}; it is not a fusedsae checkpoint or was written by another version"
        )
    digest = manifest.get("manifest_sha256")
    if digest != manifest_digest(manifest):
        raise _field_error(path, "manifest_sha256", "does not match the manifest's contents")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _field_error(path, "step", f"must be a non-negative integer, got {step!r}")
    if manifest.get("run_id") is not None and not isinstance(manifest["run_id"], str):
        raise _field_error(path, "run_id", f"must be a string, got {manifest['run_id']!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _field_error(path, "files", "must be a non-empty object {file name: {bytes, sha256}}")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..", MANIFEST):
            raise _field_error(path, "files", f"lists {name!r}, which is not a plain file name of the checkpoint")
        if not isinstance(entry, dict):
            raise _field_error(path, f"files.{name}", "must be an object {bytes, sha256}")
        size = entry.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _field_error(path, f"files.{name}.bytes", f"must be a non-negative integer, got {size!r}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise _field_error(path, f"files.{name}.sha256", f"must be 64 hex digits, got {sha!r}")
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Checks every file of a checkpoint against its manifest; returns the manifest or raises CheckpointError."""
    folder = Path(path)
    manifest = read_manifest(folder)
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


def read_checkpoint(
    path: str | Path, read_tensors: Callable[[Path], dict[str, Tensor]] = read_safetensors
) -> dict[str, Any]:
    """Verifies and reads a checkpoint: ``{file name: {key: Tensor} or JSON data}``. ``read_tensors`` reads one
    safetensors file (a latent-sharded run reads only its slice of each tensor; it raises ValueError for an
    unreadable file)."""
    folder = Path(path)
    manifest = verify_checkpoint(folder)
    out: dict[str, Any] = {}
    for name in manifest["files"]:
        try:
            out[name] = (
                read_tensors(folder / name)
                if name.endswith(".safetensors")
                else read_json(folder / name, error=CheckpointError)
            )
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    return out


# Elements checked at a time by nonfinite_tensors: torch.isfinite on a whole tensor makes temporaries of several
# bytes per element (on the CPU: |t|, two masks and the result, ~7 bytes per fp32 element: 59 MB to check a 34 MB
# SAE's training state), as much as the slice that a latent-sharded save must not duplicate; in blocks of 1M
# elements the check needs ~7 MB whatever the size, for one host read per block at save time.
FINITE_BLOCK = 1 << 20


def nonfinite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf (checked in blocks of :data:`FINITE_BLOCK`)."""

    def finite(t: Tensor) -> bool:
        flat = t.detach().reshape(-1)
        return all(bool(torch.isfinite(block).all()) for block in flat.split(FINITE_BLOCK))

    return [name for name, t in tensors.items() if isinstance(t, Tensor) and t.is_floating_point() and not finite(t)]


def newest_usable(run_dir: str | Path, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """The newest checkpoint that ``load`` accepts, as ``(folder, load(folder))``; None when the run has none.

    ``load`` raises :class:`CheckpointError` for an unusable checkpoint (this one is skipped, with a warning, for
    the next older) or :class:`CheckpointMismatch` (stop: older ones of the folder are no better). When every
    checkpoint is unusable, raises CheckpointError naming each one and its problem.
    """
    problems = []
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, load(folder)
        except CheckpointMismatch:
            raise
        except CheckpointError as exc:
            warnings.warn(f"skipping unusable checkpoint: {exc}", stacklevel=2)
            problems.append(str(exc))
    if not problems:
        return None
    raise CheckpointError(
        f"no usable checkpoint in {checkpoint_root(run_dir)} ({len(problems)} tried): " + " | ".join(problems)
    )


# ---------------------------------------------------------------------------------------------------------------
# run folders: identity and lock
# ---------------------------------------------------------------------------------------------------------------


def folder_run_ids(run_dir: str | Path) -> dict[str, str | None]:
    """What in ``run_dir`` says which run wrote it: ``{file: run id}`` (None: written without one, or unreadable)."""
    run_dir = Path(run_dir)
    owners: dict[str, str | None] = {}
    for name in (RUN_CONFIG, "summary.json"):
        path = run_dir / name
        if path.is_file():
            try:
                value = read_json(path, error=RunFolderError).get("run_id")
            except RunFolderError:
                value = None
            owners[name] = value if isinstance(value, str) else None
    for folder in list_checkpoints(run_dir):
        try:
            owners[f"{CHECKPOINTS}/{folder.name}"] = read_manifest(folder).get("run_id")
        except CheckpointError:
            owners[f"{CHECKPOINTS}/{folder.name}"] = None
    for name in ("sae", "metrics.jsonl"):
        if (run_dir / name).exists() and name not in owners:
            owners[name] = None
    return owners


def claim_run_dir(run_dir: str | Path, run_id: str, overwrite: bool = False, own_log: bool = False) -> None:
    """Makes ``run_dir`` the folder of a new run ``run_id`` (call it holding the folder's :class:`RunLock`).

    A folder holding files of another run (or of no known run) is refused with :class:`RunFolderError`, unless
    ``overwrite``: then the previous run's files (``checkpoints/``, ``sae/``, ``summary.json``, ``metrics.jsonl``,
    ``run_config.json``) are deleted; nothing else in the folder is touched. Files of run ``run_id`` itself (a run
    killed before its first checkpoint) are kept, except its log, which starts over; ``own_log`` (a resume that
    found no checkpoint) counts a log without a run id as this run's too.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir)
    owners = folder_run_ids(run_dir)
    foreign = {name: owner for name, owner in owners.items() if owner != run_id}
    own_log = (own_log or owners.get(RUN_CONFIG) == run_id) and "metrics.jsonl" in foreign
    if own_log and set(foreign) - {RUN_CONFIG} <= {"metrics.jsonl"} and owners.get(RUN_CONFIG) in (None, run_id):
        foreign = {}  # only the log of this very run, killed before its first checkpoint
    if foreign and not overwrite:
        others = sorted({owner for owner in foreign.values() if owner})
        which = f"run {', '.join(others)}" if others else "a run without a (readable) run id"
        shown = ", ".join(sorted(foreign)[:4]) + (", …" if len(foreign) > 4 else "")
        raise RunFolderError(
            f"{run_dir} holds another run ({which}: {shown}); continue it with --resume, choose another --out, or "
            "replace it with --overwrite"
        )
    if foreign or own_log:
        names = [*RUN_FILES, *([RUN_CONFIG] if RUN_CONFIG in owners and owners[RUN_CONFIG] != run_id else [])]
        for name in names:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


class RunLock:
    """An exclusive lock on a run folder while a trainer writes it: ``<run>/.lock`` holds the owner's pid and host,
    locked with ``fcntl.flock`` (released by the OS when the process dies, so a killed trainer never leaves a stale
    lock). A second trainer gets :class:`RunFolderError` naming the owner. Where ``fcntl`` does not exist (Windows)
    the lock is advisory only: the file is written, nothing is enforced."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                owner = f.read().strip() or "unknown pid"
                f.close()
                raise RunFolderError(
                    f"{self.path.parent} is being written by another trainer ({owner}); wait for it to finish, "
                    "stop it, or choose another --out"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None


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
