"""Text to capture activations from and to evaluate on: the offline Python documentation, your own files, or a
locally saved Hugging Face dataset, with a held-out split by document.

``load_texts(spec)``:

* ``"pydoc"``, ``"stdlib"``, ``"all"``: the offline text of :func:`fusedsae.capture.offline_texts`;
* a file: ``.jsonl`` holds one JSON object per line with a ``"text"`` field (one document each); any other file is
  plain text, one document per non-empty line;
* a folder or a glob (``"corpus/*.txt"``): every file in it (recursively for a folder, in sorted order) is one
  document, except ``.jsonl`` files, read as above.

``load_dataset_texts(path, column)`` reads a dataset saved with ``datasets``' ``save_to_disk`` (needs the optional
``datasets`` package). :func:`split_texts` keeps the training or the held-out documents: a document is held out
when the SHA-256 of its text falls in the first ``heldout_fraction`` of the hash range, so the split does not
depend on the order of the documents or on which other documents are present, and a document never moves
between splits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

OFFLINE = ("pydoc", "stdlib", "all")
SPLITS = ("all", "train", "heldout")
DEFAULT_HELDOUT_FRACTION = 0.1


class TextSourceError(ValueError):
    """Text that cannot be read: a missing file, a JSONL line without a text field, an empty source."""


def _jsonl(path: Path, field: str = "text") -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextSourceError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise TextSourceError(f"{path}:{number}: expected an object with a string {field!r} field")
            out.append(record[field])
    return out


def _read(path: Path, whole_file: bool) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if whole_file:
        return [text] if text.strip() else []
    return [line for line in text.splitlines() if line.strip()]


def load_texts(spec: str) -> list[str]:
    """The documents of ``spec`` (see the module doc), in a fixed order. Raises :class:`TextSourceError` (one
    line) when there is nothing to read."""
    if spec in OFFLINE:
        from fusedsae.capture import offline_texts

        return offline_texts(spec)
    path = Path(spec)
    if path.is_file():
        texts = _read(path, whole_file=False)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        texts = [t for p in files for t in _read(p, whole_file=True)]
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        texts = [t for p in files for t in _read(p, whole_file=True)]
    else:
        raise TextSourceError(
            f"--text {spec}: no such file or folder "
            f"(expected pydoc, stdlib, all, a text or JSONL file, a folder or a glob)"
        )
    if not texts:
        raise TextSourceError(f"--text {spec}: no documents found")
    return texts


def load_dataset_texts(path: str, column: str = "text") -> list[str]:
    """The ``column`` of a Hugging Face dataset saved on disk (``save_to_disk``); a DatasetDict contributes its
    splits in sorted order."""
    try:
        import datasets
    except ImportError as exc:
        raise TextSourceError("--dataset needs the Hugging Face datasets package: pip install datasets") from exc
    try:
        data = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise TextSourceError(f"--dataset {path}: not a dataset saved with save_to_disk ({exc})") from exc
    parts = [data[name] for name in sorted(data)] if isinstance(data, datasets.DatasetDict) else [data]
    texts: list[str] = []
    for part in parts:
        if column not in part.column_names:
            raise TextSourceError(f"--dataset {path} has no column {column!r}; it has {', '.join(part.column_names)}")
        texts.extend(t for t in part[column] if isinstance(t, str) and t.strip())
    if not texts:
        raise TextSourceError(f"--dataset {path}: column {column!r} holds no text")
    return texts


def is_heldout(text: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Whether ``text`` belongs to the held-out split (its SHA-256, read as a number in [0, 1), is below the
    fraction)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < heldout_fraction


def split_texts(texts: list[str], split: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[str]:
    """``texts`` of one split: ``"all"``, ``"train"`` (not held out) or ``"heldout"``, order kept."""
    if split not in SPLITS:
        raise TextSourceError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise TextSourceError(f"the held-out fraction must be in (0, 1), got {heldout_fraction}")
    if split == "all":
        return list(texts)
    want = split == "heldout"
    out = [t for t in texts if is_heldout(t, heldout_fraction) == want]
    if not out:
        raise TextSourceError(f"the {split} split of {len(texts)} documents is empty; change the held-out fraction")
    return out


def select_texts(
    text: str = "pydoc",
    dataset: str | None = None,
    text_column: str = "text",
    split: str = "all",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[str]:
    """The documents the CLI's ``--text``/``--dataset``/``--split`` options name (``dataset`` wins over ``text``)."""
    texts = load_dataset_texts(dataset, text_column) if dataset else load_texts(text)
    return split_texts(texts, split, heldout_fraction)


def describe(
    text: str = "pydoc",
    dataset: str | None = None,
    text_column: str = "text",
    split: str = "all",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> dict[str, object]:
    """What :func:`select_texts` was given, for a cache manifest or an SAE's metadata."""
    out: dict[str, object] = {"text": text} if not dataset else {"dataset": dataset, "text_column": text_column}
    if split != "all":
        out.update(split=split, heldout_fraction=heldout_fraction)
    return out


def heldout_settings(info: dict[str, object]) -> dict[str, object]:
    """:func:`select_texts` settings of the held-out split of the text that ``info`` (a :func:`describe` entry, as
    in a cache manifest or an SAE's metadata) describes."""
    return {
        "text": info.get("text", "pydoc"),
        "dataset": info.get("dataset"),
        "text_column": info.get("text_column", "text"),
        "split": "heldout",
        "heldout_fraction": info.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION),
    }
