"""Your own text (fusedsae.texts): plain files one document per line, JSONL, folders and globs one document per
file, the held-out split by document hash, and one-line errors."""

from __future__ import annotations

import json

import pytest

from fusedsae import texts as T


def test_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "lines.txt").write_text("first doc\n\n  \nsecond doc\n", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n", encoding="utf-8"
    )
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("file b\nstill b\n", encoding="utf-8")
    (corpus / "sub" / "a.txt").write_text("file a", encoding="utf-8")
    (corpus / ".hidden").write_text("skip me", encoding="utf-8")
    assert T.load_texts(str(tmp_path / "lines.txt")) == ["first doc", "second doc"]
    assert T.load_texts(str(tmp_path / "docs.jsonl")) == ["json one", "json two"]
    assert T.load_texts(str(corpus)) == ["file b\nstill b\n", "file a"]
    assert T.load_texts(str(corpus / "*.txt")) == ["file b\nstill b\n"]
    assert T.load_texts("pydoc")[:3] == T.load_texts("pydoc")[:3] and len(T.load_texts("pydoc")) > 1000


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(T.TextSourceError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        T.load_texts(str(bad))
    with pytest.raises(T.TextSourceError, match="no such file or folder"):
        T.load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TextSourceError, match="no documents"):
        T.load_texts(str(tmp_path / "empty"))
    with pytest.raises(T.TextSourceError, match="split must be"):
        T.split_texts(["a"], "test")


def test_heldout_split_is_by_document_and_stable():
    docs = [f"document number {i}" for i in range(2000)]
    train, held = T.split_texts(docs, "train", 0.1), T.split_texts(docs, "heldout", 0.1)
    assert not set(train) & set(held) and len(train) + len(held) == len(docs)
    assert 150 < len(held) < 250  # about 10% of 2000 (binomial sd 13)
    # a document's split depends on its text only: not on order or on the other documents
    assert T.split_texts(docs[::-1], "heldout", 0.1) == held[::-1]
    assert T.split_texts(docs[:500], "heldout", 0.1) == [d for d in held if d in set(docs[:500])]
    # a larger fraction holds out a superset
    assert set(held) <= set(T.split_texts(docs, "heldout", 0.3))


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["alpha doc", "", "beta doc"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert T.load_dataset_texts(str(tmp_path / "ds"), "body") == ["alpha doc", "beta doc"]
    assert T.select_texts(dataset=str(tmp_path / "ds"), text_column="body") == ["alpha doc", "beta doc"]
    assert T.describe(dataset=str(tmp_path / "ds"), text_column="body") == {
        "dataset": str(tmp_path / "ds"),
        "text_column": "body",
    }
    with pytest.raises(T.TextSourceError, match="no column 'text'; it has body, n"):
        T.load_dataset_texts(str(tmp_path / "ds"))
    with pytest.raises(T.TextSourceError, match="not a dataset saved with save_to_disk"):
        T.load_dataset_texts(str(tmp_path / "nothing"))
