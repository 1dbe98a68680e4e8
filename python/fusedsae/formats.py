"""SAE folders on disk: SAELens 6.x (read and write), sparsify and dictionary_learning (read). No pickle:
safetensors, and dictionary_learning's ``ae.pt`` through ``torch.load(weights_only=True)``.

A SAELens 6.x folder holds ``cfg.json`` (``d_in``, ``d_sae``, ``dtype``, ``architecture``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, ``k`` for TopK, and ``metadata`` with ``sae_lens_version`` >=
6.0.0), ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``,
``threshold`` for JumpReLU) and optionally ``sparsity.safetensors`` (log10 firing frequency). fusedsae writes its
own full config under ``metadata["fusedsae"]`` so that BatchTopK, ``n_heads`` and the loss coefficients survive a
round trip; SAELens keeps unknown metadata keys.

Matryoshka BatchTopK SAEs follow SAELens (>= 6.15): its training folder has ``architecture:
"matryoshka_batchtopk"`` with ``matryoshka_widths`` and the scalar ``topk_threshold``; its inference folder (what
``save_inference_model`` writes, and what fusedsae writes) is a ``jumprelu`` folder whose
``metadata.training_architecture`` is ``"matryoshka_batchtopk"`` and whose ``metadata.training_architecture_details``
holds ``k`` and ``matryoshka_widths``. fusedsae reads both back as a Matryoshka BatchTopK SAE (eval mode: the same
JumpReLU maths SAELens serves; training mode: the widths' inner losses).

Transcoders (``SAEConfig.d_out``) are written in SAELens's transcoder layout: ``d_out`` in ``cfg.json``,
``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``W_skip [d_out, d_in]`` for skip-transcoders, ``architecture``
``transcoder`` / ``skip_transcoder`` (ReLU) or ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (JumpReLU, and
BatchTopK with its threshold); see :func:`sae_lens_architecture` for the forms SAELens has no class for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fusedsae._version import __version__
from fusedsae.config import SAEConfig, dtype_from_name, dtype_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
SAE_LENS_SCHEMA_VERSION = "6.0.0"

# our activation -> SAELens inference architecture. BatchTopK is saved as JumpReLU with its scalar threshold
# repeated over latents, exactly as SAELens saves its own BatchTopK SAEs for inference.
_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
# Transcoders (SAELens 6.x ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``:
# ReLU or JumpReLU, input never centred, ``d_out`` in cfg.json, ``W_dec [d_sae, d_out]``, ``W_skip [d_out, d_in]``).
# SAELens has no TopK transcoder: a TopK one is written as "topk_transcoder" / "topk_skip_transcoder", names SAELens
# refuses by name (rather than running other maths); fusedsae reads it from metadata.fusedsae.
_TRANSCODER_ARCHITECTURE = {"relu": "transcoder", "topk": "topk_transcoder", "jumprelu": "jumprelu_transcoder"}
_TRANSCODER_ARCHITECTURE["batchtopk"] = _TRANSCODER_ARCHITECTURE["jumprelu"]
# SAELens transcoder architecture -> (our activation, skip connection)
_SAE_LENS_TRANSCODERS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


def sae_lens_architecture(cfg: SAEConfig) -> str:
    """The ``architecture`` of ``cfg.json`` for an SAE or transcoder of this config. An SAE with a skip path (as
    sparsify allows) has no SAELens class: it is written as ``<architecture>_skip``, which SAELens refuses by name."""
    if cfg.is_transcoder:
        name = _TRANSCODER_ARCHITECTURE[cfg.activation]
        return name.replace("transcoder", "skip_transcoder") if cfg.skip_connection else name
    return _ARCHITECTURE[cfg.activation] + ("_skip" if cfg.skip_connection else "")


class SAEFormatError(ValueError):
    """A folder is not a readable SAE: a file is missing, truncated or inconsistent with its config."""


def fsync_dir(path: Path) -> None:
    """Flushes a directory entry (the rename of a file inside it) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoint and cache manifests record it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# JSON files fusedsae reads (cfg.json, manifests, trainer state) are small: a SAELens cfg.json is ~2 KB, a checkpoint
# manifest under 1 KB, a cache manifest ~400 bytes per shard (64 MiB = 160k shards, 10T tokens at 65k rows per shard).
# A larger file is not one of ours; refusing it before reading avoids loading a 2 GiB file whole (+4 GB of memory).
MAX_JSON_BYTES = 64 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once the block has written it, it is fsynced and renamed onto
    ``path`` (and the folder entry fsynced), so a crash leaves the old file or the new one, never a mix. The one way
    fusedsae writes a file; on an exception the temporary file is removed and ``path`` is untouched."""
    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """``fig.savefig`` through :func:`atomic_path` (the format from ``path``'s suffix): a crash never leaves a
    half-written PNG under the final name."""
    final = Path(path)
    with atomic_path(final) as tmp:
        fig.savefig(tmp, dpi=dpi, format=final.suffix.lstrip(".") or "png")
    return final


def is_temporary(name: str) -> bool:
    """True for the names :func:`atomic_path`, :func:`save_sae` and :func:`replace_dir` use while writing: what a
    crash can leave behind, safe to delete when no writer holds the folder."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON without its own ``manifest_sha256`` field: checkpoint and cache
    manifests store it, so an edited or bit-flipped manifest is caught before any of its fields is trusted."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves the finished folder ``tmp`` to ``final``. If ``final`` exists it is first renamed aside and removed
    only after the new folder is in place, so at every instant one complete copy exists on disk."""
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sae_lens_config(sae: Any) -> dict[str, Any]:
    """The ``cfg.json`` dict of a :class:`fusedsae.SparseAutoencoder` in SAELens 6.x schema."""
    cfg: SAEConfig = sae.cfg
    out: dict[str, Any] = {
        "architecture": sae_lens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        **({"d_out": cfg.d_out} if cfg.is_transcoder else {}),
        "dtype": cfg.dtype,
        "device": str(sae.device),
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        # The weights on disk always take raw activations: the trainer folds its input scale in before saving.
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.activation == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    fused = cfg.to_dict()
    fused.pop("metadata")
    fused["normalize_activations"] = "none"
    out["metadata"] = {
        **cfg.metadata,
        "sae_lens_version": SAE_LENS_SCHEMA_VERSION,
        "fusedsae_version": __version__,
        **matryoshka_metadata(cfg),
        "fusedsae": fused,
    }
    return out


def sae_tensors(sae: Any) -> dict[str, Tensor]:
    """The tensors of ``sae_weights.safetensors`` by name (``fusedsae.sharding`` writes the same from slices)."""
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.cfg.activation in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.threshold
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    return tensors


MATRYOSHKA_ARCHITECTURE = "matryoshka_batchtopk"


def matryoshka_metadata(cfg: SAEConfig) -> dict[str, Any]:
    """The ``metadata`` keys SAELens's ``save_inference_model`` writes for a Matryoshka BatchTopK SAE
    (``training_architecture`` and its ``training_architecture_details``), so that SAELens tools and fusedsae see
    the widths; ``{}`` for any other SAE (SAELens has no Matryoshka TopK: those widths live in
    ``metadata.fusedsae`` only). The decoder norms are already folded in a fusedsae SAE, hence
    ``rescale_acts_by_decoder_norm: false``."""
    if not cfg.matryoshka_widths or cfg.activation != "batchtopk":
        return {}
    return {
        "training_architecture": MATRYOSHKA_ARCHITECTURE,
        "training_architecture_details": {
            "k": cfg.k,
            "aux_loss_coefficient": cfg.aux_loss_coefficient,
            "rescale_acts_by_decoder_norm": False,
            "topk_threshold_lr": cfg.topk_threshold_lr,
            "matryoshka_widths": list(cfg.matryoshka_widths),
            "use_matryoshka_aux_loss": False,
        },
    }


def sae_lens_matryoshka(raw: dict[str, Any], path: Path) -> tuple[int, list[int]] | None:
    """``(k, matryoshka_widths)`` of a SAELens Matryoshka BatchTopK folder's ``cfg.json`` (6.x schema), either
    form: the training folder (``architecture: "matryoshka_batchtopk"``, top-level fields) or the inference one
    (``jumprelu`` with ``metadata.training_architecture_details``); ``None`` for any other SAE. Raises
    :class:`SAEFormatError` naming the field when ``k`` or the widths are missing or malformed."""
    meta = raw.get("metadata") or {}
    if raw.get("architecture") == MATRYOSHKA_ARCHITECTURE:
        fields, prefix = raw, ""
    elif raw.get("architecture") == "jumprelu" and meta.get("training_architecture") == MATRYOSHKA_ARCHITECTURE:
        fields, prefix = meta.get("training_architecture_details"), "metadata.training_architecture_details."
        if not isinstance(fields, dict):
            raise _field_error(
                path, "metadata.training_architecture_details", "must be an object holding k and matryoshka_widths"
            )
    else:
        return None
    k, widths = fields.get("k"), fields.get("matryoshka_widths")
    if isinstance(k, float) and k.is_integer():
        k = int(k)  # SAELens types BatchTopK's k as a float
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise _field_error(path, prefix + "k", f"must be a positive integer (fusedsae's BatchTopK k), got {k!r}")
    if not isinstance(widths, list) or not widths:
        raise _field_error(path, prefix + "matryoshka_widths", f"must be a non-empty list of widths, got {widths!r}")
    return k, list(widths)


def save_sae(sae: Any, path: str | os.PathLike[str], sparsity: Tensor | None = None) -> Path:
    """Writes ``sae`` as a SAELens 6.x folder at ``path`` (atomically; see :func:`replace_dir`)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_safetensors(tmp / WEIGHTS_FILE, sae_tensors(sae))
        if sparsity is not None:
            write_safetensors(tmp / SPARSITY_FILE, {"sparsity": sparsity.float()})
        write_json(tmp / CFG_FILE, sae_lens_config(sae))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_json(path: Path, error: type[Exception] = SAEFormatError, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Reads a JSON object; raises ``error`` naming the file for a missing, oversized, truncated or non-object file
    (the size is checked before anything is read)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from exc
    if size > max_bytes:
        raise error(
            f"{path} is {size:,} bytes, more than the {max_bytes:,} a fusedsae/SAELens config or manifest can be; "
            "it is not one (or is damaged)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); the file may be truncated") from exc
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SAEFormatError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEFormatError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from exc


# ---------------------------------------------------------------------------------------------------------------
# validation of the config files we read: every field fusedsae uses, with the file and field named
# ---------------------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _field_error(path: Path, field: str, problem: str) -> SAEFormatError:
    return SAEFormatError(f"{path}: field {field!r} {problem}")


def _check_positive_int(raw: dict[str, Any], name: str, path: Path, prefix: str = "") -> None:
    value = raw.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise _field_error(path, prefix + name, f"must be a positive integer, got {value!r}")


def _check_dtype(raw: dict[str, Any], path: Path, prefix: str = "") -> None:
    value = raw.get("dtype")
    if value is not None and str(value).removeprefix("torch.") not in _FLOAT_DTYPES:
        raise _field_error(path, prefix + "dtype", f"must be one of {', '.join(_FLOAT_DTYPES)}, got {value!r}")


def check_sae_lens_cfg(raw: dict[str, Any], path: Path) -> None:
    """Validates a SAELens (6.x or older) ``cfg.json`` field by field: types and ranges of every field fusedsae
    reads, ``k`` for TopK, and, when fusedsae's own ``metadata.fusedsae`` is present, that it is a valid config
    agreeing with the top-level fields (an edited ``d_sae`` must not be silently ignored). Raises
    :class:`SAEFormatError` naming the file and field."""
    meta = raw.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise _field_error(path, "metadata", f"must be an object, got {type(meta).__name__}")
    for name in ("d_in", "d_sae", "k", "d_out"):
        _check_positive_int(raw, name, path)
    _check_dtype(raw, path)
    for name in ("architecture", "activation_fn", "activation_fn_str", "normalize_activations"):
        if raw.get(name) is not None and not isinstance(raw[name], (str, bool)):
            raise _field_error(path, name, f"must be a string, got {raw[name]!r}")
    for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if name in raw and not isinstance(raw[name], bool):
            raise _field_error(path, name, f"must be true or false, got {raw[name]!r}")
    kwargs = raw.get("activation_fn_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _field_error(path, "activation_fn_kwargs", f"must be an object, got {kwargs!r}")
    if kwargs:
        _check_positive_int(kwargs, "k", path, "activation_fn_kwargs.")
    fused = (meta or {}).get("fusedsae")
    if fused is None:
        legacy_topk = (raw.get("activation_fn") or raw.get("activation_fn_str")) == "topk"
        if raw.get("architecture") == "topk" and raw.get("k") is None and not legacy_topk:
            raise _field_error(path, "k", "is missing: a topk SAE needs k, the active latents per token")
        if legacy_topk and raw.get("k") is None and (kwargs or {}).get("k") is None:
            raise _field_error(path, "activation_fn_kwargs.k", "is missing: a topk SAE needs k")
        return
    if not isinstance(fused, dict):
        raise _field_error(path, "metadata.fusedsae", f"must be an object, got {type(fused).__name__}")
    for name in ("d_in", "d_sae", "k", "n_heads", "d_out"):
        _check_positive_int(fused, name, path, "metadata.fusedsae.")
    _check_dtype(fused, path, "metadata.fusedsae.")
    try:
        cfg = SAEConfig.from_dict({**fused, "metadata": {}})
    except (TypeError, ValueError) as exc:
        raise _field_error(path, "metadata.fusedsae", f"is not a valid fusedsae config ({exc})") from exc
    for name in ("d_in", "d_sae", "k", "dtype", "d_out"):
        if name in raw and raw[name] is not None:
            top = raw[name] if name != "dtype" else str(raw[name]).removeprefix("torch.")
            if top != getattr(cfg, name):
                raise _field_error(
                    path,
                    name,
                    f"is {raw[name]!r} but metadata.fusedsae.{name} is {getattr(cfg, name)!r}: the file was edited; "
                    "make the two agree (or delete metadata.fusedsae to use the SAELens fields)",
                )


_SPARSIFY_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def check_sparsify(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> None:
    """Validates a sparsify folder: ``cfg.json``'s ``k`` and the weight names fusedsae reads."""
    if "k" not in raw:
        raise _field_error(path, "k", "is missing: a sparsify TopK SAE needs k, the active latents per token")
    _check_positive_int(raw, "k", path)
    missing = [name for name in _SPARSIFY_TENSORS if name not in tensors]
    if missing:
        raise SAEFormatError(f"{path.parent / SPARSIFY_WEIGHTS_FILE} lacks {', '.join(missing)}")


def _version_tuple(version: Any) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def upgrade_sae_lens_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A SAELens ``cfg.json`` dict in the 6.x schema. Older (flat) configs are upgraded as SAELens's
    ``handle_pre_6_0_config`` does: ``hook_point`` → ``metadata.hook_name``, ``activation_fn_str: "topk"`` with
    ``activation_fn_kwargs.k`` → architecture ``topk``, a boolean ``normalize_activations`` → none /
    expected_average_only_in, architecture defaulting to ``standard``."""
    meta = raw.get("metadata") or {}
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    if version is not None and _version_tuple(version) >= (6,):
        return dict(raw)
    renamed = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    flat = {renamed.get(key, key): value for key, value in raw.items()}
    out: dict[str, Any] = {
        key: flat[key] for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input") if key in flat
    }
    out["architecture"] = flat.get("architecture", "standard")
    if flat.get("activation_fn", "relu") == "topk" and (flat.get("activation_fn_kwargs") or {}).get("k") is not None:
        out["architecture"] = "topk"
        out["k"] = flat["activation_fn_kwargs"]["k"]
    elif "k" in flat:
        out["k"] = flat["k"]
    norm = flat.get("normalize_activations", "none")
    out["normalize_activations"] = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    out["reshape_activations"] = "hook_z" if "hook_z" in str(flat.get("hook_name", "")) else "none"
    out["metadata"] = {
        key: flat[key]
        for key in ("model_name", "hook_name", "hook_head_index", "hook_layer", "context_size", "prepend_bos")
        if key in flat
    }
    return out


def _config_from_sae_lens(
    raw: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> tuple[SAEConfig, dict[str, Tensor], bool]:
    """(config, weights by our names, fold decoder norms after loading) from a SAELens cfg.json."""
    check_sae_lens_cfg(raw, path)
    meta = raw.get("metadata") or {}
    fused = meta.get("fusedsae")
    if isinstance(fused, dict):
        return SAEConfig.from_dict({**fused, "metadata": _user_metadata(meta)}), dict(tensors), False
    raw = upgrade_sae_lens_config(raw)
    meta = raw.get("metadata") or {}
    architecture = raw.get("architecture", "standard")
    if architecture in _SAE_LENS_TRANSCODERS:
        return _transcoder_from_sae_lens(raw, tensors, path), dict(tensors), False
    matryoshka = sae_lens_matryoshka(raw, path)
    if matryoshka is not None:
        # read as a Matryoshka BatchTopK SAE: the training folder's scalar threshold (below, as batchtopk), or the
        # inference folder's per-latent JumpReLU threshold, which a fusedsae BatchTopK uses in eval mode
        raw = {**raw, "k": matryoshka[0]}
        architecture = "batchtopk" if architecture == MATRYOSHKA_ARCHITECTURE else "matryoshka_inference"
    activation = {
        "standard": "relu",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "batchtopk": "batchtopk",
        "matryoshka_inference": "batchtopk",
    }.get(architecture)
    if activation is None:
        raise SAEFormatError(
            f"{path}: architecture {architecture!r} is not supported (fusedsae reads standard, topk, batchtopk, "
            f"matryoshka_batchtopk, jumprelu, {', '.join(_SAE_LENS_TRANSCODERS)}, and gated for inference)"
        )
    if raw.get("normalize_activations") not in (None, "none"):
        raise SAEFormatError(
            f"{path}: normalize_activations={raw['normalize_activations']!r} needs a run-time input scale that "
            "this folder does not store; fold it into the weights first (or load it with "
            "fusedsae.compat.sae_lens.SAE.load_from_disk, which applies constant_norm_rescale and layer_norm)"
        )
    W_enc = tensors.get("W_enc")
    if W_enc is None or W_enc.dim() != 2:
        raise SAEFormatError(f"{path}: sae_weights.safetensors has no 2-D W_enc")
    weights = dict(tensors)
    k = raw.get("k")
    rescale = bool(raw.get("rescale_acts_by_decoder_norm", False)) and activation == "topk"
    if architecture == "batchtopk":
        # A SAELens BatchTopK training checkpoint: the scalar EMA threshold becomes our threshold buffer, which
        # eval mode uses (JumpReLU maths, as SAELens's own inference save); its training config rescales by the
        # decoder norms by default, so fold them in (selection on pre * norm == selection after folding).
        if "topk_threshold" not in weights:
            raise SAEFormatError(f"{path}: a batchtopk folder must hold topk_threshold (SAELens's BatchTopK state)")
        weights["threshold"] = torch.full((W_enc.shape[1],), float(weights.pop("topk_threshold")), dtype=W_enc.dtype)
        rescale = bool(raw.get("rescale_acts_by_decoder_norm", True))
    cfg = SAEConfig(
        d_in=int(raw.get("d_in", W_enc.shape[0])),
        d_sae=int(raw.get("d_sae", W_enc.shape[1])),
        activation=activation,
        k=int(k) if activation in ("topk", "batchtopk") else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        dtype=str(raw.get("dtype", "float32")),
        metadata=_user_metadata(meta),
        normalize_decoder=False,
        matryoshka_widths=None if matryoshka is None else matryoshka[1],
    )
    return cfg, weights, rescale


def _transcoder_from_sae_lens(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> SAEConfig:
    """The config of a SAELens transcoder folder (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
    ``jumprelu_skip_transcoder``): ReLU or JumpReLU, ``d_out`` from cfg.json (else from ``W_dec``), the input
    never centred (SAELens refuses ``apply_b_dec_to_input`` for transcoders)."""
    architecture = raw["architecture"]
    activation, skip = _SAE_LENS_TRANSCODERS[architecture]
    W_enc, W_dec = tensors.get("W_enc"), tensors.get("W_dec")
    if W_enc is None or W_enc.dim() != 2 or W_dec is None or W_dec.dim() != 2:
        raise SAEFormatError(f"{path}: sae_weights.safetensors of a {architecture} needs 2-D W_enc and W_dec")
    if raw.get("apply_b_dec_to_input"):
        raise _field_error(path, "apply_b_dec_to_input", f"is true, which SAELens refuses for a {architecture}")
    if raw.get("normalize_activations") not in (None, "none"):
        raise SAEFormatError(
            f"{path}: normalize_activations={raw['normalize_activations']!r} needs a run-time input scale that this "
            "folder does not store; fold it into the weights first"
        )
    return SAEConfig(
        d_in=int(raw.get("d_in", W_enc.shape[0])),
        d_sae=int(raw.get("d_sae", W_enc.shape[1])),
        d_out=int(raw.get("d_out", W_dec.shape[1])),
        activation=activation,
        skip_connection=skip,
        apply_b_dec_to_input=False,
        dtype=str(raw.get("dtype", "float32")),
        metadata=_user_metadata(raw.get("metadata") or {}),
        normalize_decoder=False,
    )


def _user_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata a user or SAELens put in a folder, without what fusedsae regenerates when it saves (its own
    config and versions, and the Matryoshka training-architecture keys of :func:`matryoshka_metadata`)."""
    ours = {"fusedsae", "fusedsae_version", "sae_lens_version"}
    if meta.get("training_architecture") == MATRYOSHKA_ARCHITECTURE:
        ours |= {"training_architecture", "training_architecture_details", "sae_lens_training_version"}
    return {k: v for k, v in meta.items() if k not in ours}


def _config_from_sparsify(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> SAEConfig:
    check_sparsify(raw, tensors, path)
    W = tensors.get("encoder.weight")
    if W is None or W.dim() != 2:
        raise SAEFormatError(f"{path}: sae.safetensors has no 2-D encoder.weight")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {raw['activation']!r} is not supported (topk only)")
    for name in ("transcode", "skip_connection"):
        if not isinstance(raw.get(name, False), bool):
            raise _field_error(path, name, f"must be true or false, got {raw[name]!r}")
    skip = bool(raw.get("skip_connection", False))
    if skip != ("W_skip" in tensors):
        raise SAEFormatError(
            f"{path}: skip_connection is {str(skip).lower()} but sae.safetensors {'lacks' if skip else 'holds'} W_skip"
        )
    # sparsify's transcoders read one activation and reconstruct another of the same width (d_out = d_in), with
    # an input not centred by b_dec; its skip path is x @ W_skip.T, W_skip [d_in, d_in], on SAEs too
    transcode = bool(raw.get("transcode", False))
    return SAEConfig(
        d_in=int(W.shape[1]),
        d_sae=int(W.shape[0]),
        activation="topk",
        k=int(raw["k"]),
        d_out=int(W.shape[1]) if transcode else None,
        skip_connection=skip,
        dtype=str(W.dtype).removeprefix("torch."),
        normalize_decoder=bool(raw.get("normalize_decoder", True)),
        metadata={"source": "sparsify"},
    )


def sparsify_layers(root: Path) -> list[str]:
    """Names of the layer folders (``cfg.json`` + ``sae.safetensors``) under a sparsify multi-layer root, sorted
    by natural order (``layers.2`` before ``layers.10``)."""

    def natural(name: str) -> list[Any]:
        return [
            int(part) if part.isdigit() else part
            for part in "".join(ch if ch.isdigit() else f" {ch} " for ch in name).split()
        ]

    names = [
        child.name
        for child in Path(root).iterdir()
        if child.is_dir() and (child / CFG_FILE).is_file() and (child / SPARSIFY_WEIGHTS_FILE).is_file()
    ]
    return sorted(names, key=natural)


# dictionary_learning class name -> our activation
_DICTIONARY_LEARNING = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",  # inference only, as fusedsae.compat.sae_lens.GatedSAE (same maths as SAELens's)
}
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CONFIG = "config.json"


def _from_dictionary_learning(folder: Path) -> tuple[SAEConfig | None, dict[str, Tensor]]:
    """dictionary_learning's ``ae.pt`` (a state dict; read with ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain containers) + ``config.json`` ``{"trainer": {"dict_class": ...}}``. A
    GatedAutoEncoder has no :class:`SAEConfig`: ``(None, its weights by SAELens's gated names)``."""
    config = read_json(folder / DICTIONARY_LEARNING_CONFIG)
    trainer = config.get("trainer") or {}
    dict_class = trainer.get("dict_class")
    activation = _DICTIONARY_LEARNING.get(dict_class)
    if activation is None:
        raise SAEFormatError(
            f"{folder}: dictionary_learning class {dict_class!r} is not supported (fusedsae reads "
            f"{', '.join(_DICTIONARY_LEARNING)})"
        )
    try:
        state = torch.load(folder / DICTIONARY_LEARNING_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a truncated zip, a non-torch file: all one message
        raise SAEFormatError(
            f"{folder / DICTIONARY_LEARNING_WEIGHTS} is not a plain tensor state dict that torch.load(weights_only="
            f"True) can read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SAEFormatError(f"{folder / DICTIONARY_LEARNING_WEIGHTS} must hold a state dict of tensors")

    def need(*names: str) -> list[Tensor]:
        missing = [n for n in names if n not in state]
        if missing:
            raise SAEFormatError(f"{folder / DICTIONARY_LEARNING_WEIGHTS} ({dict_class}) lacks {', '.join(missing)}")
        return [state[n] for n in names]

    apply_b_dec = True
    if activation == "gated":
        # GatedAutoEncoder: encoder.weight [F, d] (no bias), gate_bias, mag_bias, r_mag, decoder.weight [d, F],
        # decoder_bias subtracted before encoding: SAELens's gated maths with W_enc = encoder.weightᵀ
        enc_w, dec_w, b_dec, b_gate, b_mag, r_mag = need(
            "encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias", "r_mag"
        )
        weights = {"W_enc": enc_w.t(), "W_dec": dec_w.t(), "b_dec": b_dec, "b_gate": b_gate, "b_mag": b_mag}
        weights["r_mag"] = r_mag
        return None, weights  # no SAEConfig can say "gated": load_sae builds the compat GatedSAE
    if activation == "jumprelu":
        W_enc, b_enc, W_dec, b_dec, threshold = need("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        apply_b_dec = False  # JumpReluAutoEncoder sets apply_b_dec_to_input = False and does not save it
        weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    else:
        # nn.Linear layouts: encoder.weight [F, d], decoder.weight [d, F]
        enc_w, enc_b, dec_w = need("encoder.weight", "encoder.bias", "decoder.weight")
        (b_dec,) = need("bias" if activation == "relu" else "b_dec")
        weights = {"W_enc": enc_w.t(), "b_enc": enc_b, "W_dec": dec_w.t(), "b_dec": b_dec}
        if activation == "batchtopk":
            # BatchTopKSAE encodes with its scalar threshold by default: relu(pre) * (relu(pre) > θ), which is our
            # eval-mode JumpReLU maths with θ repeated (θ = -1, "unset", keeps every positive activation, as 0 does)
            (threshold,) = need("threshold")
            weights["threshold"] = torch.full_like(enc_b, max(float(threshold), 0.0))
    k = None
    if activation in ("topk", "batchtopk"):
        k = int(state["k"]) if "k" in state else trainer.get("k")
        if k is None:
            raise SAEFormatError(f"{folder}: a {dict_class} needs k (in ae.pt or config.json's trainer)")
    W_enc = weights["W_enc"]
    cfg = SAEConfig(
        d_in=int(W_enc.shape[0]),
        d_sae=int(W_enc.shape[1]),
        activation=activation,
        k=int(k) if k is not None else None,
        apply_b_dec_to_input=apply_b_dec,
        dtype=str(W_enc.dtype).removeprefix("torch."),
        normalize_decoder=False,
        metadata={"source": "dictionary_learning", "dict_class": dict_class},
    )
    return cfg, weights


def load_sae(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    layer: str | None = None,
) -> Any:
    """Loads an SAE folder written by fusedsae, SAELens (6.x or older; standard, topk, batchtopk, jumprelu,
    Matryoshka BatchTopK in its training or inference form, read back as Matryoshka, the transcoders
    ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``, and gated for
    inference), sparsify (one layer, or ``layer=`` of a multi-layer root; transcoders and skip connections
    included) or dictionary_learning (``ae.pt`` + ``config.json``: AutoEncoder, AutoEncoderTopK, BatchTopKSAE,
    JumpReluAutoEncoder, and GatedAutoEncoder for inference).

    Returns a :class:`fusedsae.SparseAutoencoder`, except for gated folders (SAELens, dictionary_learning): a
    :class:`fusedsae.compat.sae_lens.GatedSAE` (inference only: ``encode``, ``decode``, ``forward``).
    ``device``/``dtype`` override the stored ones. Raises :class:`SAEFormatError` naming the file and the problem
    for a missing, truncated or inconsistent folder, and listing the layers of a multi-layer root.
    """
    from fusedsae.sae import SparseAutoencoder

    folder = Path(path)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder} is not a folder; an SAE is a folder with cfg.json and weights")
    if layer is not None:
        if not (folder / layer).is_dir():
            available = sparsify_layers(folder)
            raise SAEFormatError(
                f"{folder} has no layer {layer!r}; it holds {', '.join(available) if available else 'no layer folders'}"
            )
        return load_sae(folder / layer, device=device, dtype=dtype)
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        if (folder / DICTIONARY_LEARNING_WEIGHTS).is_file() and (folder / DICTIONARY_LEARNING_CONFIG).is_file():
            cfg, weights = _from_dictionary_learning(folder)
            if cfg is None:
                return _gated_sae(weights, folder, device, dtype)
            return _build(SparseAutoencoder, cfg, weights, folder, device, dtype, fold=False)
        layers = sparsify_layers(folder)
        if layers:
            raise SAEFormatError(
                f"{folder} is a multi-layer folder holding {len(layers)} SAEs: {', '.join(layers)}; load one with "
                f"fusedsae.load({str(folder)!r}, layer={layers[0]!r})"
            )
        raise SAEFormatError(
            f"{folder} has no {CFG_FILE}: it is not a SAELens, sparsify, dictionary_learning (ae.pt + config.json) "
            "or fusedsae SAE folder"
        )
    raw = read_json(cfg_path)
    fold = False
    if (folder / WEIGHTS_FILE).exists():
        tensors = read_safetensors(folder / WEIGHTS_FILE)
        check_sae_lens_cfg(raw, cfg_path)  # before anything reads a field
        if upgrade_sae_lens_config(raw).get("architecture") == "gated":
            from fusedsae.compat.sae_lens import SAE

            return SAE.load_from_disk(folder, device=str(device or "cpu"), dtype=None if dtype is None else str(dtype))
        cfg, weights, fold = _named(cfg_path, lambda: _config_from_sae_lens(raw, tensors, cfg_path))
    elif (folder / SPARSIFY_WEIGHTS_FILE).exists():
        tensors = read_safetensors(folder / SPARSIFY_WEIGHTS_FILE)
        cfg = _named(cfg_path, lambda: _config_from_sparsify(raw, tensors, cfg_path))
        weights = {
            "W_enc": tensors["encoder.weight"].t(),
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
            **({"W_skip": tensors["W_skip"]} if "W_skip" in tensors else {}),
        }
    else:
        raise SAEFormatError(f"{folder} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}")
    return _build(SparseAutoencoder, cfg, weights, folder, device, dtype, fold=fold)


def _build(
    sae_cls: Any,
    cfg: SAEConfig,
    weights: dict[str, Tensor],
    folder: Path,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    fold: bool,
) -> Any:
    changes: dict[str, Any] = {}
    if device is not None:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = str(dtype_from_name(dtype)).removeprefix("torch.")
    if changes:
        cfg = cfg.replace(**changes)
    sae = sae_cls(cfg)
    assign_weights(sae, weights, f"{folder}: weights file")
    if fold:
        sae.fold_W_dec_norm()
    return sae


def _gated_sae(
    weights: dict[str, Tensor], folder: Path, device: str | torch.device | None, dtype: str | torch.dtype | None
) -> Any:
    """A :class:`fusedsae.compat.sae_lens.GatedSAE` (inference: ``encode``, ``decode``, ``forward``,
    ``magnitude_path``) holding a dictionary_learning GatedAutoEncoder's weights (SAELens names)."""
    from fusedsae.compat.sae_lens import GatedSAE, GatedSAEConfig

    W_enc = weights["W_enc"]
    sae = GatedSAE(
        GatedSAEConfig(
            d_in=int(W_enc.shape[0]),
            d_sae=int(W_enc.shape[1]),
            dtype=dtype_name(dtype_from_name(dtype if dtype is not None else W_enc.dtype)),
            device=str(device or "cpu"),
            metadata={"source": "dictionary_learning", "dict_class": "GatedAutoEncoder"},
        )
    )
    assign_weights(sae, weights, f"{folder}: weights file")
    return sae


def _named(path: Path, build: Any) -> Any:
    """Runs ``build``; a config the SAE refuses (ValueError/TypeError from SAEConfig) becomes a SAEFormatError
    naming the file."""
    try:
        return build()
    except SAEFormatError:
        raise
    except (TypeError, ValueError) as exc:
        raise SAEFormatError(f"{path}: {exc}") from exc


def assign_weights(module: Any, weights: dict[str, Tensor], where: str, check_finite: bool = True) -> None:
    """Copies ``weights`` into ``module``'s parameters and buffers (its ``state_dict`` names, dotted ones
    included), refusing with a :class:`SAEFormatError` that starts with ``where`` (the file or folder) a missing
    tensor, a shape other than the config implies and, with ``check_finite``, a NaN/Inf."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise SAEFormatError(f"{where} lacks {', '.join(missing)}")
    with torch.no_grad():
        for name, target in expected.items():
            tensor = weights[name]
            if tensor.shape != target.shape:
                raise SAEFormatError(
                    f"{where}: {name} has shape {tuple(tensor.shape)} but cfg.json implies {tuple(target.shape)}"
                )
            if check_finite and not torch.isfinite(tensor.float()).all():
                raise SAEFormatError(f"{where}: {name} contains NaN or Inf")
            target.copy_(tensor)
