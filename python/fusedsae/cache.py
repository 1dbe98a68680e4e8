"""Activation caches on disk, and data sources that stream shuffled batches from a cache or from a live model.

A cache is a folder::

    manifest.json                 what was captured (model, hook, texts), d_in, dtype, n_heads, and every shard
    shard-000000.acts.npy         [rows, d_in] activations (bfloat16 stored as its uint16 bit pattern)
    shard-000000.tokens.npy       [rows, 3] int64: text index, position in the text, token id

A *pair cache* holds a transcoder's data: two hooks of one forward pass (``source.hook`` the input x,
``source.target_hook`` the target y), each row ``[x | y]``; its manifest has ``d_in`` (the width of x) and ``d_out``
(of y), the acts files are ``[rows, d_in + d_out]``, and it is format version 2 (a fusedsae that predates pairs
refuses it instead of misreading it). :func:`fusedsae.data.check_widths` refuses a pair cache for a plain SAE and
a plain cache for a transcoder.

Each shard holds whole texts, in order, so the manifest's ``next_text`` is where an interrupted capture resumes.
A shard's two files are written under temporary names, fsynced and renamed; only then is the shard added to the
manifest (itself replaced atomically). A crash therefore leaves a manifest listing only complete shards, plus
perhaps stray files that the next run deletes. Every file's size and SHA-256 are in the manifest: opening a cache
checks the sizes (a truncated shard is named in the error), :meth:`ActivationCache.verify` the hashes, and
re-running the capture re-verifies the shards and rewrites from the first broken one. Training verifies each shard
as it first reads it (size always, SHA-256 once per shard per run), so a flipped bit stops the run with the shard's
name instead of training on garbage. The manifest carries its own SHA-256 and is validated field by field; shard
file names must be plain ``shard-NNNNNN.*.npy`` names inside the folder (no ``..``, absolute paths or links out).

Memory-mapped ``.npy`` rather than safetensors: any row range of a shard can be read without loading the file.

:class:`CacheSource` and :class:`LiveSource` follow :mod:`fusedsae.data`'s conventions: batch ``i`` of rank ``r``
is rows ``[(i * world + r) * batch, +batch)`` of the epoch's stream; the stream of epoch ``e`` is a fixed function
of ``(seed, e)``: groups of shards (texts) in a shuffled order, each group's rows permuted, so a shuffle buffer of
``buffer_tokens`` rows gives a near-global shuffle; ``state_dict`` is ``{"epoch", "position"}``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusedsae.formats import atomic_write, manifest_digest, read_json, sha256_file
from fusedsae.toy import generator

CACHE_FORMAT = "fusedsae-activation-cache"
CACHE_VERSION = 1
# Pair caches (d_out in the manifest) are version 2: version-1 readers would take d_in for the row width.
PAIR_CACHE_VERSION = 2
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"^shard-\d{6}$")
_SHARD_FILE = re.compile(r"^shard-\d{6}\.(acts|tokens)\.npy$")
_TMP_FILE = re.compile(r"^\.(shard-\d{6}\.(acts|tokens)\.npy|manifest\.json)\.tmp-[0-9a-f-]+$")
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Rows held by a shuffle buffer when none is given: 512 MiB of float32 activations.
_DEFAULT_BUFFER_BYTES = 512 << 20
# (epoch, group) pairs map to distinct generator streams as long as an epoch has fewer than 2^20 groups.
_GROUPS_PER_EPOCH = 1 << 20


class CacheError(ValueError):
    """An activation cache folder is missing, incomplete, corrupt, or was written with other settings."""


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _bad_field(path: Path, field: str, problem: str) -> CacheError:
    return CacheError(
        f"{path}: field {field!r} {problem}; the manifest was edited or damaged (re-run the same `fusedsae cache` "
        "command with --overwrite to rewrite the cache)"
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_manifest(folder: Path) -> dict[str, Any]:
    """Reads ``manifest.json`` and validates it field by field (:class:`CacheError` naming file, field and fix)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} has no {MANIFEST}: it is not an activation cache (write one with `fusedsae cache`)")
    manifest = read_json(path, error=CacheError)
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not a fusedsae activation-cache manifest")
    if manifest.get("version") not in (CACHE_VERSION, PAIR_CACHE_VERSION):
        raise CacheError(
            f"{path} has cache format version {manifest.get('version')}; this fusedsae reads {CACHE_VERSION} and "
            f"{PAIR_CACHE_VERSION}"
        )
    # Caches written before the manifest carried its digest have none; every manifest written now has one.
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        raise _bad_field(path, "manifest_sha256", "does not match the manifest's contents")
    d_in = manifest.get("d_in")
    if not _is_count(d_in) or d_in < 1:
        raise _bad_field(path, "d_in", f"must be a positive integer, got {d_in!r}")
    d_out = manifest.get("d_out")
    if manifest["version"] == PAIR_CACHE_VERSION and (not _is_count(d_out) or d_out < 1):
        raise _bad_field(path, "d_out", f"must be a positive integer in a pair cache (version 2), got {d_out!r}")
    if manifest["version"] == CACHE_VERSION and d_out is not None:
        raise _bad_field(path, "d_out", "belongs to pair caches (version 2), not to a version-1 cache")
    if manifest.get("dtype") not in _STORAGE:
        raise _bad_field(path, "dtype", f"must be one of {sorted(_STORAGE)}, got {manifest.get('dtype')!r}")
    n_heads = manifest.get("n_heads")
    if n_heads is not None and (not _is_count(n_heads) or n_heads < 1):
        raise _bad_field(path, "n_heads", f"must be a positive integer or null, got {n_heads!r}")
    for name in ("rows", "next_text", "n_texts"):
        if not _is_count(manifest.get(name)):
            raise _bad_field(path, name, f"must be a non-negative integer, got {manifest.get(name)!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise _bad_field(path, "shards", "must be a list")
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise _bad_field(path, where, "must be an object")
        name = shard.get("name")
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise _bad_field(path, f"{where}.name", f"must be shard-NNNNNN, got {name!r}")
        for key in ("rows", "first_text", "end_text"):
            if not _is_count(shard.get(key)):
                raise _bad_field(path, f"{where}.{key}", f"must be a non-negative integer, got {shard.get(key)!r}")
        files = shard.get("files")
        expected = {f"{name}.acts.npy", f"{name}.tokens.npy"}
        if not isinstance(files, dict) or set(files) != expected:
            raise _bad_field(path, f"{where}.files", f"must list exactly {sorted(expected)}")
        for file, entry in files.items():
            if not isinstance(entry, dict) or not _is_count(entry.get("bytes")):
                raise _bad_field(path, f"{where}.files.{file}.bytes", "must be a non-negative integer")
            digest = entry.get("sha256")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise _bad_field(path, f"{where}.files.{file}.sha256", f"must be 64 hex digits, got {digest!r}")
    return manifest


def shard_path(folder: Path, name: str) -> Path:
    """The path of shard file ``name`` of the cache at ``folder``; :class:`CacheError` unless it is a plain shard
    file name whose real location (links followed) is inside the folder."""
    if not _SHARD_FILE.match(name):
        raise CacheError(f"{folder}: {name!r} is not a shard file name (shard-NNNNNN.acts.npy / .tokens.npy)")
    path = folder / name
    if path.is_symlink() or path.exists():
        real, root = path.resolve(), folder.resolve()
        if real.parent != root:
            raise CacheError(
                f"{folder}: shard file {name} is a link to {real}, outside the cache folder; a cache reads only "
                "its own files (copy the data into the folder)"
            )
    return path


def _check_file(folder: Path, name: str, entry: dict[str, Any], shard: str, hash_it: bool) -> None:
    path = shard_path(folder, name)
    fix = "re-run the same `fusedsae cache` command to rewrite it"
    if not path.is_file():
        raise CacheError(f"{folder}: shard {shard} is missing its file {name}; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheError(
            f"{folder}: shard {shard} file {name} has {size} bytes but the manifest says {entry['bytes']} "
            f"(truncated or partially written); {fix}"
        )
    if hash_it and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{folder}: shard {shard} file {name} does not match its SHA-256 (corrupt); {fix}")


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------


class ActivationCache:
    """A finished (or, with ``allow_incomplete``, partial) cache folder.

    Opening checks the manifest and every file's size; ``verify=True`` also checks every SHA-256 (reads all data).
    Raises :class:`CacheError` naming the shard and the fix.
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = False, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CacheError(f"{self.path} is not a folder; an activation cache is a folder with {MANIFEST}")
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        if not m.get("complete") and not allow_incomplete:
            raise CacheError(
                f"{self.path} is incomplete: {m.get('next_text', 0)} of {m.get('n_texts')} texts captured "
                "(the capture was interrupted); re-run the same `fusedsae cache` command to finish it"
            )
        self.d_in = int(m["d_in"])
        self.d_out: int | None = m.get("d_out")  # a pair cache's target width; None: plain activations
        self.width = self.d_in + (self.d_out or 0)  # columns of a row ([x | y] for pairs)
        self.dtype = str(m["dtype"])
        if self.dtype not in _STORAGE:
            raise CacheError(f"{self.path}: unknown cache dtype {self.dtype!r}")
        self.n_heads: int | None = m.get("n_heads")
        self.shards: list[dict[str, Any]] = list(m["shards"])
        self.verified: set[str] = set()  # shard files whose SHA-256 this object has checked (read once per run)
        for shard in self.shards:
            for name, entry in shard["files"].items():
                _check_file(self.path, name, entry, shard["name"], hash_it=verify)
                if verify:
                    self.verified.add(name)
        self.shard_rows = [int(s["rows"]) for s in self.shards]
        self.rows = sum(self.shard_rows)

    @property
    def source(self) -> dict[str, Any]:
        """How the activations were captured (model, hook, texts, ...)."""
        return dict(self.manifest.get("source", {}))

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def verify(self) -> None:
        """Checks every file against its SHA-256; raises :class:`CacheError` naming the first bad shard."""
        for shard in self.shards:
            for name, entry in shard["files"].items():
                _check_file(self.path, name, entry, shard["name"], hash_it=True)
                self.verified.add(name)

    def _load(self, index: int, kind: str, width: int) -> np.ndarray:
        shard = self.shards[index]
        name = f"{shard['name']}.{kind}.npy"
        # size on every read (a stat); the SHA-256 the first time this object reads the file: one extra read of
        # each shard per run, so a flipped bit stops training with the shard's name instead of producing NaNs
        _check_file(self.path, name, shard["files"][name], shard["name"], hash_it=name not in self.verified)
        self.verified.add(name)
        try:
            array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CacheError(
                f"{self.path}: shard {shard['name']} file {name} is not a readable .npy file ({exc}); "
                "re-run the same `fusedsae cache` command to rewrite it"
            ) from exc
        if array.shape != (shard["rows"], width):
            raise CacheError(
                f"{self.path}: shard {shard['name']} file {name} holds shape {array.shape}, the manifest says "
                f"({shard['rows']}, {width})"
            )
        return array

    def activations(self, index: int) -> Tensor:
        """Shard ``index``'s activations ``[rows, d_in]`` (``[rows, d_in + d_out]`` rows ``[x | y]`` in a pair cache)
        in the cache's dtype (a copy in memory)."""
        array = np.array(self._load(index, "acts", self.width))
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor

    def tokens(self, index: int) -> Tensor:
        """Shard ``index``'s ``[rows, 3]`` int64: text index, position, token id of each row."""
        return torch.from_numpy(np.array(self._load(index, "tokens", 3)))

    def describe(self) -> dict[str, Any]:
        pair = {} if self.d_out is None else {"d_out": self.d_out}
        return {"kind": "cache", "path": str(self.path), "rows": self.rows, "d_in": self.d_in, **pair, **self.source}


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------


class CacheWriter:
    """Writes a cache shard by shard; reopening a folder with the same settings resumes it.

    ``settings`` (d_in, d_out, dtype, n_heads, shard_tokens, n_texts, source) must match the folder's on resume,
    otherwise :class:`CacheError` says what differs. ``d_out`` makes a pair cache (rows ``[x | y]``, version 2). On
    resume the listed shards are re-verified (size and SHA-256); the first broken one and everything after it are
    dropped and captured again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        d_in: int,
        n_texts: int,
        source: dict[str, Any],
        dtype: str = "float32",
        n_heads: int | None = None,
        shard_tokens: int = 65536,
        overwrite: bool = False,
        d_out: int | None = None,
    ) -> None:
        if d_out is not None and d_out < 1:
            raise ValueError(f"d_out must be >= 1 (or None for plain activations), got {d_out}")
        if dtype not in _STORAGE:
            raise ValueError(f"cache dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.path = Path(path)
        self.settings = {
            "d_in": int(d_in),
            "dtype": dtype,
            "n_heads": n_heads,
            "shard_tokens": int(shard_tokens),
            "n_texts": int(n_texts),
            "source": source,
        }
        # only pair caches carry d_out, so that plain manifests stay as they were
        if d_out is not None:
            self.settings["d_out"] = int(d_out)
        self.width = int(d_in) + (d_out or 0)
        if overwrite and (self.path / MANIFEST).is_file():
            shutil.rmtree(self.path)  # only ever a folder that holds a cache manifest
        if (self.path / MANIFEST).is_file():
            self.manifest = self._reopen()
        else:
            if self.path.exists() and any(not _TMP_FILE.match(p.name) for p in self.path.iterdir()):
                raise CacheError(f"{self.path} exists and is not an activation cache; choose an empty or new folder")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION if d_out is None else PAIR_CACHE_VERSION,
                **self.settings,
                "rows": 0,
                "next_text": 0,
                "complete": False,
                "shards": [],
            }
            _write_manifest(self.path, self.manifest)
        self._remove_strays()
        self._pending: list[Any] = []
        self._pending_rows = 0
        self._pending_first = self._pending_end = self.next_text

    def _reopen(self) -> dict[str, Any]:
        manifest = _read_manifest(self.path)
        # d_out too when not set: a plain capture must not resume a pair cache (or the reverse)
        keys = dict.fromkeys([*self.settings, "d_out"])
        differ = [k for k in keys if manifest.get(k) != self.settings.get(k)]
        if differ:
            detail = "; ".join(
                f"{k}: folder has {manifest.get(k)!r}, asked for {self.settings.get(k)!r}" for k in differ
            )
            raise CacheError(
                f"{self.path} holds a cache written with other settings ({detail}); use another folder, or overwrite "
                "it (--overwrite)"
            )
        kept = []
        for shard in manifest["shards"]:
            try:
                for name, entry in shard["files"].items():
                    _check_file(self.path, name, entry, shard["name"], hash_it=True)
            except CacheError:
                break
            kept.append(shard)
        if len(kept) < len(manifest["shards"]):
            manifest["shards"] = kept
            manifest["rows"] = sum(int(s["rows"]) for s in kept)
            manifest["next_text"] = kept[-1]["end_text"] if kept else 0
            manifest["complete"] = False
            _write_manifest(self.path, manifest)
        return manifest

    def _remove_strays(self) -> None:
        listed = {name for shard in self.manifest["shards"] for name in shard["files"]}
        for p in self.path.iterdir():
            if _TMP_FILE.match(p.name) or (_SHARD_FILE.match(p.name) and p.name not in listed):
                p.unlink()

    @property
    def next_text(self) -> int:
        """The first text not yet in a written shard."""
        return int(self.manifest["next_text"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def add(self, first: int, end: int, acts: Tensor, tokens: Tensor) -> None:
        """Adds the rows of texts ``[first, end)``: ``acts [rows, d_in]`` and ``tokens [rows, 3]`` (text index,
        position, token id). Texts must arrive in order; a shard is written once ``shard_tokens`` rows are pending."""
        expected = self._pending_end
        if first != expected:
            raise ValueError(f"texts must be added in order: expected text {expected}, got {first}")
        if acts.shape != (tokens.shape[0], self.width) or tokens.shape[1:] != (3,):
            raise ValueError(
                f"acts must be [rows, {self.width}] and tokens [rows, 3]; got {tuple(acts.shape)} "
                f"and {tuple(tokens.shape)}"
            )
        self._pending.append((acts, tokens))
        self._pending_rows += int(acts.shape[0])
        self._pending_end = end
        if self._pending_rows >= self.settings["shard_tokens"]:
            self.flush()

    def flush(self) -> None:
        """Writes the pending texts as one shard (no-op when nothing is pending)."""
        if not self._pending:
            return
        acts = torch.cat([a for a, _ in self._pending]).detach().cpu()
        tokens = torch.cat([t for _, t in self._pending]).to(torch.int64).cpu()
        dtype = self.settings["dtype"]
        acts = acts.to(_TORCH_DTYPE[dtype])
        array = acts.view(torch.uint16).numpy() if dtype == "bfloat16" else acts.numpy()
        index = len(self.manifest["shards"])
        name = _shard_name(index)
        files = {}
        for kind, data in (("acts", _npy_bytes(array)), ("tokens", _npy_bytes(tokens.numpy()))):
            file = f"{name}.{kind}.npy"
            atomic_write(self.path / file, data)
            files[file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.manifest["shards"].append(
            {
                "name": name,
                "rows": int(acts.shape[0]),
                "first_text": self._pending_first,
                "end_text": self._pending_end,
                "files": files,
            }
        )
        self.manifest["rows"] += int(acts.shape[0])
        self.manifest["next_text"] = self._pending_end
        _write_manifest(self.path, self.manifest)
        self._pending = []
        self._pending_rows = 0
        self._pending_first = self._pending_end

    def finish(self) -> ActivationCache:
        """Writes the last shard and marks the cache complete."""
        self.flush()
        if self.next_text != self.settings["n_texts"]:
            raise CacheError(
                f"{self.path}: only {self.next_text} of {self.settings['n_texts']} texts were added; cannot finish"
            )
        self.manifest["complete"] = True
        _write_manifest(self.path, self.manifest)
        return ActivationCache(self.path)


def write_cache(
    path: str | os.PathLike[str],
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    hook: Any,
    *,
    n_heads: int | None = None,
    source: dict[str, Any] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    shard_tokens: int = 65536,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    target_hook: Any = None,
) -> ActivationCache:
    """Captures ``hook`` (a :class:`fusedsae.capture.HookSpec`, or a list of them: several hooks from one forward
    pass, stored side by side as ``[rows, sum of widths]``; the manifest's source lists ``hooks`` and ``widths``)
    over ``texts`` into a cache at ``path``.

    ``target_hook`` (a HookSpec) makes a pair cache for transcoders: ``hook`` (one hook: x) and ``target_hook`` (y)
    from the same forward pass, rows ``[x | y]``, ``d_in``/``d_out`` in the manifest, ``source.target_hook`` naming
    y.

    Resumes an interrupted cache written with the same settings (``source`` describes the capture: model, hook,
    texts; it is part of the settings compared on resume). ``progress(done_texts, n_texts)`` is called after each
    batch. Returns the finished :class:`ActivationCache`.
    """
    from fusedsae.capture import iter_capture

    hooks = pair_hooks(hook, target_hook)
    widths = _probe_widths(model, tokenizer, texts, hooks, max_length)
    d_in, d_out = (sum(widths), None) if target_hook is None else (widths[0], widths[1])
    # Everything that changes the rows: a resume with other texts or batching would mix two different captures
    # (the batch size changes the padding, hence the float rounding of the model's matmuls).
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    info = {
        **describe_hooks(hooks, widths, paired=target_hook is not None),
        "max_length": max_length,
        "batch_size": batch_size,
        "texts_sha256": digest,
        **(source or {}),
    }
    writer = CacheWriter(
        path,
        d_in=d_in,
        n_texts=len(texts),
        source=info,
        dtype=dtype,
        n_heads=n_heads,
        shard_tokens=shard_tokens,
        overwrite=overwrite,
        d_out=d_out,
    )
    if writer.complete:
        return ActivationCache(path)
    specs = {str(i): h for i, h in enumerate(hooks)}
    for first, end, batch in iter_capture(
        model, tokenizer, texts, specs, batch_size=batch_size, max_length=max_length, start=writer.next_text
    ):
        meta = torch.stack([batch.text_index, batch.position, batch.token_ids], dim=1)
        writer.add(first, end, side_by_side(batch.acts, len(hooks)), meta)
        if progress is not None:
            progress(end, len(texts))
    return writer.finish()


def hook_list(hook: Any) -> list[Any]:
    """``[hook]`` for one :class:`fusedsae.capture.HookSpec`, the list itself for several."""
    hooks = [hook] if hasattr(hook, "to_dict") else list(hook)
    if not hooks:
        raise ValueError("no hook to capture")
    return hooks


def pair_hooks(hook: Any, target_hook: Any) -> list[Any]:
    """The hooks to capture in one pass: :func:`hook_list` of ``hook``, then ``target_hook`` when one is given (a
    transcoder's y; ``hook`` must then be one hook, its x)."""
    hooks = hook_list(hook)
    if target_hook is None:
        return hooks
    if len(hooks) != 1:
        raise ValueError(
            f"a transcoder reads one hook and reconstructs another; got {len(hooks)} input hooks and a target hook"
        )
    return [hooks[0], target_hook]


def describe_hooks(hooks: list[Any], widths: list[int], paired: bool = False) -> dict[str, Any]:
    """The manifest/describe entry of the captured hooks: ``{"hook": spec}`` for one (the original format),
    ``{"hooks": [spec, ...], "widths": [...]}`` for several side by side, ``{"hook": x, "target_hook": y}`` for a
    transcoder's pair (``paired``: ``hooks`` is ``[x, y]``)."""
    if paired:
        return {"hook": hooks[0].to_dict(), "target_hook": hooks[1].to_dict()}
    if len(hooks) == 1:
        return {"hook": hooks[0].to_dict()}
    return {"hooks": [h.to_dict() for h in hooks], "widths": list(widths)}


def side_by_side(acts: dict[str, Tensor], n: int) -> Tensor:
    """The captures of hooks ``"0" .. str(n - 1)`` as one ``[rows, sum of widths]`` tensor, in hook order."""
    return acts["0"] if n == 1 else torch.cat([acts[str(i)] for i in range(n)], dim=1)


def _probe_widths(model: Any, tokenizer: Any, texts: Sequence[str], hooks: list[Any], max_length: int) -> list[int]:
    from fusedsae.capture import capture, tokenize

    if not texts:
        raise ValueError("no texts to capture")
    specs = {str(i): h for i, h in enumerate(hooks)}
    batch = capture(model, tokenize(tokenizer, texts[:1], max_length), specs)
    return [int(batch.acts[str(i)].shape[1]) for i in range(len(hooks))]


# ---------------------------------------------------------------------------------------------------------------
# data sources
# ---------------------------------------------------------------------------------------------------------------


class _GroupStream:
    """Shuffled batches from a sequence of groups (shuffle buffers) whose sizes are known in advance.

    Subclasses give ``_group_sizes(epoch)`` and ``_load_group(epoch, g)`` (the group's rows, unpermuted); this class
    permutes each group with a generator drawn from ``(seed, epoch, g)``, concatenates the groups into the epoch's
    stream, and cuts it into batches (the last incomplete global batch of an epoch is dropped).
    """

    rows: int
    d_in: int

    def __init__(self, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._offsets: dict[int, list[int]] = {}
        self._loaded: dict[tuple[int, int], Tensor] = {}

    def _check_rows(self) -> None:
        if self.rows < self.batch_size * self.world_size:
            raise ValueError(
                f"{self.rows} rows cannot fill one batch of {self.batch_size} on {self.world_size} rank(s)"
            )

    def _group_sizes(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def _load_group(self, epoch: int, group: int) -> Tensor:
        raise NotImplementedError

    def _group_offsets(self, epoch: int) -> list[int]:
        if epoch not in self._offsets:
            offsets = [0]
            for size in self._group_sizes(epoch):
                offsets.append(offsets[-1] + size)
            self._offsets = {epoch: offsets}
        return self._offsets[epoch]

    def _group(self, epoch: int, group: int) -> Tensor:
        key = (epoch, group)
        if key not in self._loaded:
            rows = self._load_group(epoch, group)
            if self.shuffle:
                g = generator(self.seed, 2 * (epoch * _GROUPS_PER_EPOCH + group) + 1)
                rows = rows[torch.randperm(rows.shape[0], generator=g)]
            # keep the current group and the one before it: a batch spans at most a few groups
            self._loaded = {k: v for k, v in self._loaded.items() if k[0] == epoch and k[1] >= group - 1}
            self._loaded[key] = rows
        return self._loaded[key]

    def _rows_between(self, epoch: int, lo: int, hi: int) -> Tensor:
        offsets = self._group_offsets(epoch)
        pieces = []
        while lo < hi:
            group = bisect.bisect_right(offsets, lo) - 1
            start = lo - offsets[group]
            take = min(hi, offsets[group + 1]) - lo
            pieces.append(self._group(epoch, group)[start : start + take])
            lo += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def next_batch(self) -> Tensor:
        step = self.batch_size * self.world_size
        if self.position + step > self.rows:
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.batch_size
        batch = self._rows_between(self.epoch, start, start + self.batch_size)
        self.position += step
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def _order(self, n: int, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        g = generator(self.seed, 2 * epoch * _GROUPS_PER_EPOCH)
        return torch.randperm(n, generator=g).tolist()


class CacheSource(_GroupStream):
    """Shuffled ``[batch_size, d_in]`` batches from an activation cache (float32, CPU).

    Each epoch visits the shards in a shuffled order, grouped into shuffle buffers of about ``buffer_tokens`` rows
    (default: 512 MiB of float32) whose rows are permuted; ``shuffle=False`` streams the rows in cache order.
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | ActivationCache,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_tokens: int | None = None,
        verify: bool = False,
    ) -> None:
        super().__init__(batch_size, shuffle, seed, rank, world_size)
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache, verify=verify)
        self.d_in = self.cache.d_in
        self.d_out = self.cache.d_out  # a pair cache's: batches are [batch_size, d_in + d_out] rows [x | y]
        self.n_heads = self.cache.n_heads
        self.rows = self.cache.rows
        self.buffer_tokens = buffer_tokens or max(1, _DEFAULT_BUFFER_BYTES // (4 * self.cache.width))
        self._check_rows()
        self._plans: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        """Shards of each shuffle buffer of ``epoch``: the epoch's shard order cut greedily at ``buffer_tokens``."""
        if epoch not in self._plans:
            groups: list[list[int]] = []
            rows = 0
            for shard in self._order(self.cache.n_shards, epoch):
                if not groups or (rows + self.cache.shard_rows[shard] > self.buffer_tokens and rows > 0):
                    groups.append([])
                    rows = 0
                groups[-1].append(shard)
                rows += self.cache.shard_rows[shard]
            self._plans = {epoch: groups}
        return self._plans[epoch]

    def _group_sizes(self, epoch: int) -> list[int]:
        return [sum(self.cache.shard_rows[s] for s in group) for group in self._plan(epoch)]

    def _load_group(self, epoch: int, group: int) -> Tensor:
        shards = self._plan(epoch)[group]
        return torch.cat([self.cache.activations(s).float() for s in shards])

    def describe(self) -> dict[str, Any]:
        # the shuffle settings decide the batches as much as the rows do: Trainer.resume compares them
        return {**self.cache.describe(), "shuffle": self.shuffle, "seed": self.seed}


class LiveSource(_GroupStream):
    """Shuffled batches captured live from a model: each epoch takes the texts in a shuffled order, captures
    ``buffer_texts`` of them at a time (one shuffle buffer) and permutes their tokens. ``hook`` may be a list: the
    hooks are captured in one forward pass and batches hold them side by side (``widths`` says how wide each is).

    Deterministic and resumable like :class:`CacheSource` (a resumed run recaptures the current buffer). Every
    rank runs the model on every text of a buffer; for multi-process training write a cache first. ``info`` is
    added to :meth:`describe` (the model's name, say, for the SAE's metadata).

    ``target_hook``: transcoder pairs, ``hook`` (one: x) and ``target_hook`` (y) from the same forward pass, rows
    ``[x | y]``; ``d_in`` is the width of x and ``d_out`` of y (None without a target).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        texts: Sequence[str],
        hook: Any,
        batch_size: int,
        n_heads: int | None = None,
        max_length: int = 128,
        capture_batch_size: int = 32,
        buffer_texts: int = 512,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        info: dict[str, Any] | None = None,
        target_hook: Any = None,
    ) -> None:
        super().__init__(batch_size, shuffle, seed, rank, world_size)
        if not texts:
            raise ValueError("LiveSource needs at least one text")
        self.model = model
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.hooks = pair_hooks(hook, target_hook)
        self.target_hook = target_hook
        self.hook = self.hooks[0] if len(self.hooks) == 1 or target_hook is not None else None
        self.n_heads = n_heads
        self.max_length = max_length
        self.capture_batch_size = capture_batch_size
        self.buffer_texts = buffer_texts
        self.info = dict(info or {})
        encoded = tokenizer(self.texts, truncation=True, max_length=max_length)
        self.lengths = [len(ids) for ids in encoded["input_ids"]]
        self.rows = sum(self.lengths)
        self.widths = _probe_widths(model, tokenizer, self.texts, self.hooks, max_length)
        self.d_in = sum(self.widths) if target_hook is None else self.widths[0]
        self.d_out: int | None = None if target_hook is None else self.widths[1]
        self._check_rows()
        self._text_orders: dict[int, list[int]] = {}

    def _texts_of(self, epoch: int, group: int) -> list[int]:
        if epoch not in self._text_orders:
            self._text_orders = {epoch: self._order(len(self.texts), epoch)}
        order = self._text_orders[epoch]
        return order[group * self.buffer_texts : (group + 1) * self.buffer_texts]

    def _group_sizes(self, epoch: int) -> list[int]:
        n_groups = -(-len(self.texts) // self.buffer_texts)
        return [sum(self.lengths[i] for i in self._texts_of(epoch, g)) for g in range(n_groups)]

    def _load_group(self, epoch: int, group: int) -> Tensor:
        from fusedsae.capture import iter_capture

        chosen = [self.texts[i] for i in self._texts_of(epoch, group)]
        specs = {str(i): h for i, h in enumerate(self.hooks)}
        parts = [
            side_by_side(batch.acts, len(self.hooks))
            for _, _, batch in iter_capture(
                self.model, self.tokenizer, chosen, specs, self.capture_batch_size, self.max_length
            )
        ]
        rows = torch.cat(parts)
        expected = self._group_sizes(epoch)[group]
        if rows.shape[0] != expected:
            raise RuntimeError(f"captured {rows.shape[0]} tokens but the tokenizer counted {expected}")
        return rows

    def describe(self) -> dict[str, Any]:
        hooks = describe_hooks(self.hooks, self.widths, paired=self.target_hook is not None)
        pair = {} if self.d_out is None else {"d_in": self.d_in, "d_out": self.d_out}
        stream = {"shuffle": self.shuffle, "seed": self.seed}
        return {"kind": "live", "texts": len(self.texts), "rows": self.rows, **hooks, **pair, **stream, **self.info}
