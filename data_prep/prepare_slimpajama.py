"""SlimPajama-627B, as downloaded (train/chunk*/example_train_*.jsonl.zst, validation/..., test/...), to litdata
token chunks for config_hub/tinyllama.yaml.

    git clone https://huggingface.co/datasets/cerebras/SlimPajama-627B data/raw/SlimPajama-627B
    python -m data_prep.prepare_slimpajama --input_dir data/raw/SlimPajama-627B --tokenizer_dir TOKENIZER_DIR

Like TinyLlama, drops SlimPajama's GitHub subset: StarCoder supplies the code of the mixture.
"""

import sys
import time
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI

from model import InputError
from corpus import find_files
from data_prep.prepare_text import report, tokenize_to_chunks


def main(*, input_dir: Path, tokenizer_dir: Path, out_dir: Path = Path("data/slimpajama"), workers: int = 8,
         fast_dev_run: bool = False) -> None:
    """Tokenize SlimPajama's train and validation splits into out_dir/train and out_dir/val.

    Args:
        input_dir: the downloaded dataset, holding train/ and validation/.
        tokenizer_dir: a directory with tokenizer.json (TinyLlama uses the Llama 2 tokenizer).
        out_dir: where train/ and val/ go.
        workers: tokenizing processes.
        fast_dev_run: a few files of each split, to try the pipeline in seconds.
    """
    start = time.perf_counter()
    splits = {}
    for raw, split in (("train", "train"), ("validation", "val")):
        files = find_files(Path(input_dir) / raw, "*.jsonl.zst")
        splits[Path(out_dir) / split] = files[:4] if fast_dev_run else files
    tokenize_to_chunks(splits, tokenizer_dir, workers=workers, keep_row=not_github)  # both splits or neither
    report(Path(out_dir) / "train", Path(out_dir) / "val", start=start)


def not_github(row: dict) -> bool:
    return row.get("meta", {}).get("redpajama_set_name") != "RedPajamaGithub"


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
