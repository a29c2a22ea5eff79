"""PoSE data: every file format yields the same documents, short ones are skipped and counted, the stream resumes."""

import json

import pytest
import torch

from ctxext_kernels.pose.data import DocumentStream, python_docs_path, read_texts, tokenize_documents
from pose_fixtures import byte_tokenizer

TEXTS = ["first document, long enough", "second one, also long enough", "tiny"]


def test_formats(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for index, text in enumerate(TEXTS):
        (folder / f"{index}.txt").write_text(text)
    (folder / "ignored.bin").write_bytes(b"\0")
    assert list(read_texts(folder)) == TEXTS
    (tmp_path / "one.txt").write_text(TEXTS[0])
    assert list(read_texts(tmp_path / "one.txt")) == TEXTS[:1]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    assert list(read_texts(tmp_path / "d.jsonl")) == TEXTS
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: no field 'text'"):
        list(read_texts(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_texts(tmp_path / "missing.jsonl"))


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.table({"text": TEXTS}), tmp_path / "d.parquet")
    assert list(read_texts(tmp_path / "d.parquet")) == TEXTS


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    assert list(read_texts(tmp_path / "ds")) == TEXTS
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="has no column 'text' \\(columns: \\['body'\\]\\)"):
        list(read_texts(tmp_path / "other"))


def test_short_documents_are_skipped_and_counted():
    tokenizer = byte_tokenizer()
    documents, skipped = tokenize_documents(TEXTS, tokenizer, min_tokens=10, progress=False)
    assert skipped == 1 and [len(d) for d in documents] == [len(TEXTS[0]), len(TEXTS[1])]
    with pytest.raises(ValueError, match="no document has the 1000 tokens"):
        tokenize_documents(TEXTS, tokenizer, min_tokens=1000, progress=False)


def test_stream_covers_each_epoch_and_resumes_exactly():
    documents = [torch.tensor([i]) for i in range(7)]
    stream = DocumentStream(documents, seed=3)
    first_epoch = sorted(int(d) for d in stream.take(7))
    assert first_epoch == list(range(7))
    reference = [int(d) for d in DocumentStream(documents, seed=3).take(20)]
    interrupted = DocumentStream(documents, seed=3)
    head = [int(d) for d in interrupted.take(9)]
    resumed = DocumentStream(documents, seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    assert head + [int(d) for d in resumed.take(11)] == reference
    with pytest.raises(ValueError, match="resume with the same data"):
        DocumentStream(documents[:5], seed=3).load_state_dict(interrupted.state_dict())


def test_python_docs_path_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        python_docs_path(tmp_path / "nowhere")
