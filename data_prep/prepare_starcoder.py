"""StarCoderData, as downloaded (LANGUAGE/train-*.parquet with a `content` column), to litdata token chunks
for config_hub/tinyllama.yaml.

    git clone https://huggingface.co/datasets/bigcode/starcoderdata data/raw/starcoderdata
    python -m data_prep.prepare_starcoder --input_dir data/raw/starcoderdata --tokenizer_dir TOKENIZER_DIR
"""

import sys
import time
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI

from model import InputError
from corpus import find_files
from data_prep.prepare_text import report, tokenize_to_chunks


def main(*, input_dir: Path, tokenizer_dir: Path, out_dir: Path = Path("data/starcoder"), workers: int = 8,
         fast_dev_run: bool = False) -> None:
    """Tokenize every parquet file under input_dir into out_dir (all of it trains: TinyLlama validates on
    SlimPajama).

    Args:
        input_dir: the downloaded dataset, one folder of parquet files per language.
        tokenizer_dir: a directory with tokenizer.json (TinyLlama uses the Llama 2 tokenizer).
        out_dir: where the chunks go.
        workers: tokenizing processes.
        fast_dev_run: a few files, to try the pipeline in seconds.
    """
    start = time.perf_counter()
    files = find_files(Path(input_dir), "*.parquet")
    tokenize_to_chunks({Path(out_dir): files[:4] if fast_dev_run else files}, tokenizer_dir, text_field="content",
                       workers=workers)
    report(Path(out_dir), start=start)


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
