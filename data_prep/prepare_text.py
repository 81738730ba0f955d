"""Tokenize a corpus into litdata token chunks that pretrain.py streams.

    python -m data_prep.prepare_text --inputs CORPUS_DIR --tokenizer_dir TOKENIZER_DIR --out_dir data/corpus
    python -m data_prep.prepare_text --inputs a.jsonl b.jsonl.zst --text_field text ... --fast_dev_run true

Text files (one document each), JSONL / .jsonl.zst (one per line) and parquet (one per row). Each document
becomes bos + tokens + eos. Whole files go to the train or the val split (a stable hash of the path decides),
so a document never straddles both. Writes out_dir/train and out_dir/val.
"""

import hashlib
import json
import os
import sys
from argparse import ArgumentError
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from jsonargparse import CLI
from litdata import TokensLoader, optimize

from checkpoint import atomic_directory, check_writable_directory, require
from model import InputError
from corpus import find_files, read_documents
from tokenizer import Tokenizer


def main(*, inputs: str | list[str], tokenizer_dir: Path, out_dir: Path, pattern: str = "*", exclude: list[str] = [],
         text_field: str = "text", val_fraction: float = 0.05, workers: int = 2, chunk_bytes: str = "64MB",
         fast_dev_run: bool = False) -> None:
    """Tokenize `inputs` into out_dir/train and out_dir/val.

    Args:
        inputs: a file or directory (searched recursively), or a list of them.
        tokenizer_dir: a directory with tokenizer.json (a checkpoint or a trained tokenizer).
        out_dir: where the train/ and val/ chunk directories go.
        pattern: glob that files inside directories must match (e.g. "*.py").
        exclude: folder names to skip inside directories (e.g. site-packages test).
        text_field: the JSONL / parquet field that holds the text.
        val_fraction: share of files held out for validation.
        workers: tokenizing processes.
        chunk_bytes: size of each chunk file.
        fast_dev_run: process a handful of files end to end, to try a pipeline in seconds.
    """
    require(0 <= val_fraction < 1, "--val_fraction", val_fraction, "a fraction in [0, 1)")
    require(workers >= 1, "--workers", workers, "a positive number of processes")
    files = find_files(inputs, pattern, exclude)
    if fast_dev_run:
        files = files[:10]
    train, val = split_files(files, val_fraction)
    print(f"{len(files)} files: {len(train)} train, {len(val)} val")
    start = time.perf_counter()
    tokenize_to_chunks({out_dir / "train": train, out_dir / "val": val}, tokenizer_dir, text_field, workers,
                       chunk_bytes)
    report(out_dir / "train", out_dir / "val", start=start)


def tokenize_to_chunks(splits: dict[Path, list[Path]], tokenizer_dir: Path, text_field: str = "text",
                       workers: int = 2, chunk_bytes: str = "64MB", keep_row=None) -> None:
    """Every document of each split's files -> token chunks in the split's directory, one worker process per
    share of the files. All or nothing: each directory is written under a temporary name, and they replace what
    was there only once every split is complete and, together, they hold at least one document. A split with no
    files is not written."""
    splits = {Path(d): files for d, files in splits.items() if files}
    inputs = [f for files in splits.values() for f in files]
    for out_dir in splits:
        check_writable_directory(out_dir, reads=[tokenizer_dir, *inputs])  # now, not after the splits before it
    if not splits:
        return
    tokenizer = Tokenizer(tokenizer_dir)  # fail here, not in a worker, if the tokenizer is bad
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise InputError(f"{tokenizer_dir}: the tokenizer needs bos and eos tokens to separate documents")
    with ExitStack() as stack:  # an error anywhere inside discards every split's temporary directory
        written = {}
        for out_dir, files in splits.items():
            tmp = written[out_dir] = stack.enter_context(atomic_directory(out_dir))
            split_workers = min(workers, len(files))
            # the cores shared out between the workers: each worker's encoder threads on top of the other workers'
            # oversubscribe the machine (2 workers x 2 threads on 2 cores: 575-625k tokens/s, x 1 thread: 650-750k)
            threads = max(1, (os.cpu_count() or 1) // split_workers)
            errors = tmp.with_name(tmp.name + ".err")
            tokenize = TokenizeFile(tokenizer_dir, text_field, keep_row, threads, errors)
            try:
                optimize(fn=tokenize, inputs=[str(f) for f in files], output_dir=str(tmp), num_workers=split_workers,
                         chunk_bytes=chunk_bytes, item_loader=TokensLoader(), mode="overwrite", start_method="fork",
                         keep_data_ordered=True)  # each worker its own share of the files, in order: the same
                # chunks from the same inputs every time (a shared queue hands files out as workers come free)
                if errors.is_file():  # a file the user must fix: the workers recorded it and stopped tokenizing
                    raise InputError(errors.read_text().splitlines()[0])
            finally:
                errors.unlink(missing_ok=True)
        # the workers skip what they cannot read (not UTF-8) with a warning: no documents at all is an error here,
        # or an empty dataset would replace a good one and pretraining would find nothing in it
        documents = {out_dir: count(tmp)[0] for out_dir, tmp in written.items()}
        if not any(documents.values()):
            what = (f"{inputs[0]} holds" if len(inputs) == 1
                    else f"the {len(inputs)} input files ({inputs[0]}, ...) hold")
            raise InputError(f"no documents: {what} no text that is UTF-8 and not filtered out; nothing "
                             f"replaced in {', '.join(map(str, splits))}")
        for out_dir in (d for d, n in documents.items() if n == 0):  # e.g. val drew only unreadable files
            warnings.warn(f"{out_dir}: no documents: its {len(splits[out_dir])} input file(s) hold no text that is "
                          "UTF-8 and not filtered out", stacklevel=2)


def report(*chunk_dirs: Path, start: float) -> None:
    elapsed = time.perf_counter() - start
    counts = {d: count(d) for d in chunk_dirs}
    documents, tokens = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    parts = ", ".join(f"{d.name} {c[1]:,}" for d, c in counts.items())
    print(f"done: {documents:,} documents, {tokens:,} tokens ({parts}) in {elapsed:.1f}s = "
          f"{tokens / elapsed:,.0f} tokens/s")


class TokenizeFile:
    """What each worker runs on one file: yields one token tensor per document (bos ... eos). A file the user must
    fix (a JSONL line without the text field) is reported in `errors`, for the main process to raise once optimize
    returns, and not raised here: in litdata's ordered mode a worker's InputError left the main process waiting
    forever (an unexpected error such as a RuntimeError still comes through). Once an error is recorded, every worker
    skips the files left."""

    def __init__(self, tokenizer_dir: Path, text_field: str, keep_row=None, threads: int = 1,
                 errors: Path | None = None):
        self.tokenizer_dir, self.text_field, self.keep_row, self.threads = tokenizer_dir, text_field, keep_row, threads
        self.errors, self.tokenizer = errors, None

    def __call__(self, path: str):
        if self.tokenizer is None:  # loaded once per worker process, before its encoder starts any thread
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.threads > 1 else "false"
            os.environ["RAYON_NUM_THREADS"] = str(self.threads)
            self.tokenizer = Tokenizer(self.tokenizer_dir)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        if self.errors is not None and self.errors.is_file():
            return
        try:
            documents = list(read_documents(Path(path), self.text_field, self.keep_row))
        except InputError as e:
            if self.errors is None:
                raise
            with open(self.errors, "a", encoding="utf-8") as f:
                f.write(f"{e}\n")
            return
        for start in range(0, len(documents), 256):  # the Rust encoder parallelises a batch
            for encoding in self.tokenizer.backend.encode_batch(documents[start:start + 256], add_special_tokens=False):
                yield torch.tensor([bos, *encoding.ids, eos], dtype=torch.int32)


def split_files(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """A stable split by path hash; at least one val file when there are two or more and val_fraction > 0."""
    def bucket(p: Path) -> float:
        return int(hashlib.sha1(str(p).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    val = [f for f in files if bucket(f) < val_fraction]
    if not val and val_fraction > 0 and len(files) > 1:
        val = [min(files, key=bucket)]
    train = [f for f in files if f not in set(val)]
    return train, val


def count(chunk_dir: Path) -> tuple[int, int]:
    """Documents and tokens in a chunk directory, read from litdata's index."""
    index = chunk_dir / "index.json"
    if not index.is_file():
        return 0, 0
    chunks = json.loads(index.read_text())["chunks"]
    return sum(c["chunk_size"] for c in chunks), sum(c["dim"] for c in chunks)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
