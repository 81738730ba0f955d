"""data_prep/arithmetic.py: deterministic, disjoint splits, correct answers."""

import json
import re
from pathlib import Path

import pytest

from data_prep import arithmetic
from model import InputError

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\? Answer with the number alone on the last line\.")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_and_disjoint(tmp_path):
    arithmetic.main(out_dir=tmp_path / "a", n_train=300, n_val=50, seed=7)
    arithmetic.main(out_dir=tmp_path / "b", n_train=300, n_val=50, seed=7)
    arithmetic.main(out_dir=tmp_path / "c", n_train=300, n_val=50, seed=8)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    train, val = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "a" / "val.jsonl")
    assert (len(train), len(val)) == (300, 50)
    train_q, val_q = {r["prompt"] for r in train}, {r["prompt"] for r in val}
    assert len(train_q) == 300 and len(val_q) == 50 and not train_q & val_q


def test_answers_correct(tmp_path):
    # every question of a small space: both splits together hold all 3 x 6 x 6 of them
    arithmetic.main(out_dir=tmp_path, n_train=100, n_val=8, operations="+-*", max_operand=5)
    records = read(tmp_path / "train.jsonl") + read(tmp_path / "val.jsonl")
    assert {QUESTION.fullmatch(r["prompt"]).group(2) for r in records} == {"+", "-", "*"}
    for r in records:
        a, op, b = QUESTION.fullmatch(r["prompt"]).groups()
        assert 0 <= int(a) <= 5 and 0 <= int(b) <= 5
        assert isinstance(r["answer"], str) and int(r["answer"]) == eval(f"{a} {op} {b}")


def test_too_many_questions_refused(tmp_path):
    with pytest.raises(InputError, match=r"--n_train \+ --n_val 109: expected at most 108"):
        arithmetic.main(out_dir=tmp_path, n_train=100, n_val=9, operations="+-*", max_operand=5)
    assert not (tmp_path / "train.jsonl").exists()
