"""The built-in corpus: the CPython standard library's own sources, on every machine with Python.
Trains the default tokenizer on it and writes its litdata chunks; skips what is already there.

    python -m data_prep.prepare_stdlib       # -> checkpoints/stdlib-tokenizer, data/stdlib/{train,val}
"""

import sys
from argparse import ArgumentError
import sysconfig
from pathlib import Path

from jsonargparse import CLI

from checkpoint import require
from model import InputError
from data_prep import prepare_text, train_tokenizer

# The stdlib without its test suites, bundled tools and whatever pip installed beside it
EXCLUDE = ["site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"]


def main(tokenizer_dir: Path = Path("checkpoints/stdlib-tokenizer"), out_dir: Path = Path("data/stdlib"),
         vocab_size: int = 8192, workers: int = 2) -> None:
    """Prepare the stdlib corpus for config_hub/stdlib.yaml.

    Args:
        tokenizer_dir: where the trained tokenizer goes.
        out_dir: where the train/ and val/ chunks go.
        vocab_size: tokenizer vocabulary (must equal the model's vocab_size).
        workers: tokenizing processes.
    """
    require(vocab_size >= train_tokenizer.MIN_VOCAB, "--vocab_size", vocab_size,
            f"at least {train_tokenizer.MIN_VOCAB} (256 bytes and two special tokens)")
    require(workers >= 1, "--workers", workers, "a positive number of processes")
    stdlib = sysconfig.get_paths()["stdlib"]
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer.main(inputs=stdlib, out_dir=tokenizer_dir, vocab_size=vocab_size, pattern="*.py",
                             exclude=EXCLUDE)
    if not (out_dir / "train" / "index.json").is_file():
        prepare_text.main(inputs=stdlib, tokenizer_dir=tokenizer_dir, out_dir=out_dir, pattern="*.py",
                          exclude=EXCLUDE, workers=workers)
    print(f"ready: {tokenizer_dir}, {out_dir}")


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
