"""Finding and reading the documents of a corpus: shared by the tokenizer trainer and the data preparation."""

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from model import InputError


def find_files(inputs: str | list[str], pattern: str = "*", exclude: list[str] = ()) -> list[Path]:
    """Files named directly, plus those under directories that match pattern and have no folder named in
    exclude on their way down (e.g. site-packages, test), in a stable order."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)  # one path, not its characters
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob(pattern) if p.is_file()
                                and not set(p.relative_to(path).parts[:-1]) & set(exclude)))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not files:
        raise InputError(f"no input files found in {', '.join(map(str, inputs))} matching {pattern!r}")
    return files


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field)


def read_documents(path: Path, text_field: str = "text", keep_row=None) -> Iterator[str]:
    """One file's documents: a text file is one document; JSONL (optionally zstd-compressed) one per line;
    parquet one per row. keep_row(row) -> bool filters JSONL rows. A file that is not UTF-8 is skipped with a
    warning that names it."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq  # only needed for parquet corpora (StarCoder)
            for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif name.endswith((".jsonl", ".jsonl.zst", ".json.zst")):
            with open_text(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        text = row[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise InputError(f"{path}:{line_no}: expected a JSON object with a "
                                         f"{text_field!r} string field") from None
                    if text and (keep_row is None or keep_row(row)):
                        yield text
        else:
            text = path.read_text(encoding="utf-8")
            if text:
                yield text
    except UnicodeDecodeError:
        warnings.warn(f"skipping {path}: not UTF-8 text", stacklevel=2)


def open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard  # only needed for .zst corpora (SlimPajama)
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")
