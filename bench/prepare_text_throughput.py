"""Tokens/s of data_prep/prepare_text.py beside the plain litdata recipe: the same corpus, tokenizer and run.

    python bench/prepare_text_throughput.py                          # the stdlib corpus, 2 workers
    python bench/prepare_text_throughput.py --workers 1
    python bench/prepare_text_throughput.py --inputs DIR --pattern "*.txt" --tokenizer_dir TOKENIZER_DIR

The baseline is how LitGPT prepares pretraining data: `litdata.optimize` over the files with one worker, each
document encoded on its own (`tokenizer.encode`), bos + ids + eos per document, into one output directory. Ours is
`prepare_text.py` itself (batched encoding in each worker, a train and a val split). Each runs in a fresh process;
tokens/s = the tokens written / the wall time from the files found to the last index written.
"""

import argparse
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.prepare_stdlib import EXCLUDE  # noqa: E402


class EncodeEachDocument:
    """The baseline's per-file function: one `encode` call per document."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir, self.tokenizer = tokenizer_dir, None

    def __call__(self, path: str):
        import torch

        from corpus import read_documents
        from tokenizer import Tokenizer
        if self.tokenizer is None:
            self.tokenizer = Tokenizer(Path(self.tokenizer_dir))
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        for text in read_documents(Path(path)):
            ids = self.tokenizer.backend.encode(text, add_special_tokens=False).ids
            yield torch.tensor([bos, *ids, eos], dtype=torch.int32)


def baseline(args) -> None:
    from litdata import TokensLoader, optimize

    from corpus import find_files
    from data_prep.prepare_text import count
    files = find_files(args.inputs, args.pattern, EXCLUDE)
    start = time.perf_counter()  # as prepare_text.py: after finding the files
    optimize(fn=EncodeEachDocument(str(args.tokenizer_dir)), inputs=[str(f) for f in files],
             output_dir=str(args.out_dir), num_workers=1, chunk_bytes="64MB", item_loader=TokensLoader(),
             mode="overwrite", start_method="fork")
    elapsed = time.perf_counter() - start
    tokens = count(args.out_dir)[1]
    print(f"done: {tokens:,} tokens in {elapsed:.1f}s = {tokens / elapsed:,.0f} tokens/s")


def measure(cmd: list[str]) -> tuple[int, float]:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    match = re.search(r"done: .*?([\d,]+) tokens\b.*? in ([\d.]+)s", result.stdout)
    return int(match.group(1).replace(",", "")), float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--pattern", default="*.py")
    parser.add_argument("--tokenizer_dir", type=Path, default=ROOT / "checkpoints" / "stdlib-tokenizer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--out_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(args)
    if not (args.tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"{args.tokenizer_dir}: no tokenizer.json (python -m data_prep.prepare_stdlib trains the default)")

    rows = {"ours (prepare_text.py)": [], "litdata.optimize, encode per document, 1 worker": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):  # alternating, so a change in the machine's load hits both
            rows["ours (prepare_text.py)"].append(measure(
                [sys.executable, "-m", "data_prep.prepare_text", "--inputs", args.inputs, "--pattern", args.pattern,
                 "--exclude", str(EXCLUDE).replace("'", '"'), "--tokenizer_dir", str(args.tokenizer_dir),
                 "--out_dir", f"{tmp}/ours", "--workers", str(args.workers)]))
            rows["litdata.optimize, encode per document, 1 worker"].append(measure(
                [sys.executable, __file__, "--baseline", "--inputs", args.inputs, "--pattern", args.pattern,
                 "--tokenizer_dir", str(args.tokenizer_dir), "--out_dir", f"{tmp}/baseline"]))
    ceiling = encoder_alone(args)
    print(f"\n{args.inputs} ({args.pattern}), tokenizer {args.tokenizer_dir}, ours with {args.workers} worker(s)")
    print(f"{'':<50} {'tokens':>11} {'best s':>7} {'tokens/s':>11}")
    for name, runs in rows.items():
        tokens, seconds = runs[0][0], min(s for _, s in runs)
        print(f"{name:<50} {tokens:>11,} {seconds:>7.2f} {tokens / seconds:>11,.0f}")
    print(f"{'the ceiling: encode_batch alone, every core':<50} {ceiling[0]:>11,} {ceiling[1]:>7.2f} "
          f"{ceiling[0] / ceiling[1]:>11,.0f}")


def encoder_alone(args) -> tuple[int, float]:
    """The tokenizer's own speed on the whole corpus, already in memory, one process using every core: no reading,
    no writing, no worker processes. Nothing built on this tokenizer library prepares the corpus faster."""
    from corpus import find_files, read_documents
    from tokenizer import Tokenizer
    documents = [d for f in find_files(args.inputs, args.pattern, EXCLUDE) for d in read_documents(f)]
    encoder = Tokenizer(args.tokenizer_dir).backend
    best = float("inf")
    for _ in range(args.reps):
        start = time.perf_counter()
        tokens = sum(len(e.ids) for e in encoder.encode_batch(documents, add_special_tokens=False))
        best = min(best, time.perf_counter() - start)
    return tokens + 2 * len(documents), best  # + bos and eos, as written to the chunks


if __name__ == "__main__":
    main()
