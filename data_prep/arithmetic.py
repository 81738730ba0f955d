"""A small verifiable task for RL (grpo.py): two-operand integer arithmetic questions with their answers.

    python -m data_prep.arithmetic --out_dir data/arithmetic
    python -m data_prep.arithmetic --out_dir data/arith-mul --operations '+-*' --max_operand 20 --n_train 1000

Writes out_dir/train.jsonl and out_dir/val.jsonl, one prompt record a line:
{"prompt": "What is 37 + 48? Answer with the number alone on the last line.", "answer": "85"}.
Operands are integers in [0, max_operand], the operation one of `operations`; answers may be negative. Every
question is distinct, so no question is in both splits. The same arguments always give the same files.
"""

import json
import operator
import os
import random
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI

from checkpoint import check_writable_directory, require
from model import InputError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PROMPT = "What is {a} {op} {b}? Answer with the number alone on the last line."


def main(*, out_dir: Path, n_train: int = 2000, n_val: int = 200, seed: int = 1337, operations: str = "+-",
         max_operand: int = 50) -> None:
    """Write n_train training and n_val validation questions to out_dir/train.jsonl and out_dir/val.jsonl.

    Args:
        out_dir: where train.jsonl and val.jsonl go (other files in it are left alone).
        n_train: training questions.
        n_val: validation questions.
        seed: the random seed; the same arguments give the same files.
        operations: the operations to draw from, any of "+", "-", "*" (e.g. "+-*").
        max_operand: operands are integers from 0 to this, inclusive.
    """
    require(n_train >= 0, "--n_train", n_train, "a non-negative number of questions")
    require(n_val >= 0, "--n_val", n_val, "a non-negative number of questions")
    require(max_operand >= 1, "--max_operand", max_operand, "a positive integer")
    ops = "".join(dict.fromkeys(operations))  # unique, in the order given
    require(bool(ops) and all(op in OPERATIONS for op in ops), "--operations", repr(operations),
            f"one or more of {''.join(OPERATIONS)!r}")
    distinct = len(ops) * (max_operand + 1) ** 2
    require(n_train + n_val <= distinct, "--n_train + --n_val", n_train + n_val,
            f"at most {distinct}, the distinct questions of {ops!r} on operands 0..{max_operand}")
    records = make_records(n_train + n_val, seed, ops, max_operand)
    check_writable_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.jsonl", records[:n_train]), ("val.jsonl", records[n_train:])):
        write_jsonl(out_dir / name, split)
    print(f"{out_dir}: {n_train} train, {n_val} val questions ({ops!r}, operands 0..{max_operand})")


def make_records(n: int, seed: int, operations: str, max_operand: int) -> list[dict]:
    """n distinct questions, drawn without replacement from every (operation, a, b) with a, b in 0..max_operand."""
    width = max_operand + 1
    records = []
    for index in random.Random(seed).sample(range(len(operations) * width * width), n):
        op, rest = divmod(index, width * width)
        a, b = divmod(rest, width)
        op = operations[op]
        records.append({"prompt": PROMPT.format(a=a, op=op, b=b), "answer": str(OPERATIONS[op](a, b))})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write through a temporary sibling and rename it, so a killed run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
