"""Training text: local files read into documents, tokenized, too-short ones skipped, and a resumable document stream.

Formats: a .txt file (one document), a folder (every *.txt / *.rst / *.md file below it is one document), .jsonl (one
document per line, field "text"), .parquet (column "text", needs pyarrow) and a `datasets` folder written by
`save_to_disk` (needs datasets). The optional libraries load only for their format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".rst", ".md")


def python_docs_path(root: Path = PYTHON_DOCS) -> Path:
    """The reST sources of the Python 3.11 documentation (Debian package python3.11-doc): long real English text."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: install the Python docs with `apt-get install -y python3.11-doc` "
                                "(or pass --data with your own text)")
    return root


HELDOUT_EVERY = 10  # one document in HELDOUT_EVERY is held out for evaluation


def is_heldout(text: str) -> bool:
    """Whether a document belongs to the evaluation split: a fixed 1 in `HELDOUT_EVERY` by the SHA-256 of its text,
    so the split needs no file list and the same text is held out wherever it appears. Training that should not see
    the evaluation text keeps the documents for which this is False."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % HELDOUT_EVERY == 0


def read_texts(path: str | Path, field: str = "text") -> Iterator[str]:
    """Yield the documents stored at `path` (see the module docstring for the formats), in a fixed order."""
    path = Path(path)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        yield from _read_saved_dataset(path, field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
        for file in files:
            yield file.read_text(errors="replace")
    elif not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, field)
    else:
        yield path.read_text(errors="replace")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict) or field not in record:
                fields = f"fields: {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise ValueError(f"{path}:{number}: no field {field!r} ({fields})")
            yield _text(record[field], f"{path}:{number}")


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    pq = _optional_import("pyarrow.parquet", "pyarrow", ".parquet files")
    try:
        columns = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError) all mean "not parquet"
        raise ValueError(f"{path} is not a readable parquet file ({exc})") from exc
    if field not in columns:
        raise ValueError(f"{path} has no column {field!r} (columns: {columns})")
    for row, value in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
        yield _text(value, f"{path} row {row}")


def _read_saved_dataset(path: Path, field: str) -> Iterator[str]:
    datasets = _optional_import("datasets", "datasets", "`datasets` folders")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if field not in data.column_names:
        raise ValueError(f"dataset {path} has no column {field!r} (columns: {data.column_names})")
    for row, value in enumerate(data[field]):
        yield _text(value, f"{path} row {row}")


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field holds a {type(value).__name__}, not a string")
    return value


def _optional_import(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the {package} package: pip install {package} (or "
                          "ctxext_kernels[pose])") from None


def tokenize_documents(texts, tokenizer, min_tokens: int, max_documents: int | None = None,
                       progress: bool = True) -> tuple[list[torch.Tensor], int]:
    """Tokenize documents (no special tokens) and keep those with at least `min_tokens` tokens.

    Returns
    -------
    documents : list[torch.Tensor]
        `[Lx]` int64 token ids per kept document.
    skipped : int
        How many documents were shorter than `min_tokens`.
    """
    documents, skipped = [], 0
    for text in tqdm(texts, desc="tokenizing", unit="doc", disable=not progress):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            skipped += 1
            continue
        documents.append(torch.tensor(ids, dtype=torch.long))
        if max_documents is not None and len(documents) >= max_documents:
            break
    if not documents:
        raise ValueError(f"no document has the {min_tokens} tokens one sample needs ({skipped} shorter ones skipped)")
    return documents, skipped


def fingerprint(documents: list[torch.Tensor]) -> str:
    """SHA-256 of the token stream: every document's length and token ids, in order. Equal fingerprints mean the
    same training data (same texts, same tokenizer, same selection)."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(np.int64(document.numel()).tobytes())
        digest.update(document.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


class DocumentStream:
    """An endless, seeded, resumable walk over documents: a fresh permutation every epoch.

    `state_dict()` is the position (epoch, index) only; the order is recomputed from the seed, so a restored stream
    yields exactly the documents the uninterrupted one would have.
    """

    def __init__(self, documents: list[torch.Tensor], seed: int = 0):
        self.documents = documents
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.documents))

    def next(self) -> torch.Tensor:
        if self.index == len(self.documents):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        document = self.documents[self._order[self.index]]
        self.index += 1
        return document

    def take(self, count: int) -> list[torch.Tensor]:
        return [self.next() for _ in range(count)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_documents": len(self.documents)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_documents"] != len(self.documents) or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data stream had {state['num_documents']} documents (seed "
                             f"{state['seed']}), this run has {len(self.documents)} (seed {self.seed}): resume with "
                             "the same data and settings")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
