"""What a user already has is never lost: an output path that is a file, a kill inside an atomic write, a corpus
with nothing readable in it. The scripts run in subprocesses as a user runs them (README: python -m data_prep.X)."""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import checkpoint
from checkpoint import atomic_directory
from model import InputError
from conftest import ROOT
from data_prep import prepare_text, train_tokenizer

VOCAB = 300  # 256 byte symbols, 2 specials and a few merges: as small as train_tokenizer allows to matter


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory, by relative path."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(cmd: list[str]) -> str:
    """Run a script that must fail on bad input: non-zero, no traceback, and one `error:` line, the last."""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr[-3000:]
    return lines[-1]


def write_good_corpus(path: Path) -> Path:
    path.mkdir(parents=True)
    for i in range(4):
        (path / f"module_{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(20)))
    return path


def write_latin1_corpus(path: Path, n_files: int = 1) -> Path:
    path.mkdir(parents=True)
    for i in range(n_files):  # not UTF-8: read_documents skips them
        (path / f"latin1_{i}.py").write_bytes(f"caf\xe9 = {i}\n".encode("latin-1"))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A trained tokenizer and a prepared dataset, the user's work that a failed run must leave alone."""
    root = tmp_path_factory.mktemp("good")
    corpus = write_good_corpus(root / "corpus")
    train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=VOCAB)
    prepare_text.main(inputs=str(corpus), tokenizer_dir=root / "tokenizer", out_dir=root / "chunks", workers=1,
                      val_fraction=0.25)
    return root


# atomic_directory


def test_an_existing_file_at_out_dir_is_an_error_and_is_left_alone(tmp_path):
    target = tmp_path / "out"
    target.write_bytes(b"the user's file\n")
    before = digest(target)
    with pytest.raises(InputError, match=str(target)):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
    assert digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden .out.old-PID or .out.tmp-*


def test_a_file_where_a_parent_directory_is_expected_is_an_error(tmp_path):
    run_dir = tmp_path / "run"  # e.g. pretrain.py --out_dir run, writing run/step-00000010
    run_dir.write_bytes(b"not a directory\n")
    with pytest.raises(InputError, match=str(run_dir)):
        with atomic_directory(run_dir / "step-00000010"):
            pass
    assert run_dir.read_bytes() == b"not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_tokenizer_out_dir_that_is_a_file(tmp_path):
    corpus = write_good_corpus(tmp_path / "corpus")
    target = tmp_path / "tokenizer.json"  # a plausible slip: the file instead of its directory
    target.write_text('{"the": "user\'s tokenizer"}')
    before = digest(target)
    line = error_line([sys.executable, "-m", "data_prep.train_tokenizer", "--inputs", str(corpus),
                       "--out_dir", str(target), "--vocab_size", str(VOCAB)])
    assert str(target) in line and "not a directory" in line
    assert digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tokenizer.json"]


def make_dir(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(text)
    (path / "state").mkdir()
    (path / "state" / "train_state.pt").write_text(text)
    return path


KILL_BETWEEN_RENAMES = """
    import os, sys
    sys.path.insert(0, {root!r})
    from checkpoint import atomic_directory

    rename = os.rename

    def rename_then_die(src, dst):  # the first rename happens, then the process dies as under SIGKILL: no cleanup
        rename(src, dst)
        os._exit(9)

    with atomic_directory({out!r}) as tmp:
        (tmp / "model.safetensors").write_text("new")
        os.rename = rename_then_die  # pathlib's rename calls os.rename too
"""


def kill_between_renames(out: Path) -> None:
    script = textwrap.dedent(KILL_BETWEEN_RENAMES).format(root=str(ROOT), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-3000:]
    # the window the kill hit: the old directory under its hidden name, no out_dir at all
    assert not out.exists() and len(list(out.parent.glob(f".{out.name}.old-*"))) == 1


@pytest.fixture(scope="module")
def killed_between_renames(tmp_path_factory) -> Path:
    """A directory whose writer died between atomic_directory's two renames; one subprocess, copied per test."""
    root = tmp_path_factory.mktemp("killed")
    out = make_dir(root / "run" / "final", "old")
    kill_between_renames(out)
    return root / "run"


@pytest.fixture
def killed_run(killed_between_renames, tmp_path) -> Path:
    return Path(shutil.copytree(killed_between_renames, tmp_path / "run", symlinks=True))


def test_cleanup_restores_what_a_kill_between_the_renames_left(killed_run):
    removed = checkpoint.remove_stale_temporaries(killed_run)
    out = killed_run / "final"
    assert (out / "model.safetensors").read_text() == "old" and (out / "state" / "train_state.pt").read_text() == "old"
    assert sorted(p.name for p in killed_run.iterdir()) == ["final"]  # the complete .final.tmp-* went too
    assert len(removed) == 1 and removed[0].name.startswith(".final.tmp-")


def test_the_next_write_restores_what_a_kill_between_the_renames_left(killed_run):
    out = killed_run / "final"
    with pytest.raises(RuntimeError, match="fails"):  # the next write fails too: the old contents must be back
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_text("newer")
            raise RuntimeError("the next write fails")
    assert (out / "model.safetensors").read_text() == "old"
    with atomic_directory(out) as tmp:  # and one that succeeds replaces them, leaving no .old behind
        (tmp / "model.safetensors").write_text("newest")
    assert (out / "model.safetensors").read_text() == "newest" and not (out / "state").exists()
    assert not list(killed_run.glob(".final.old-*"))


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = make_dir(tmp_path / "final", "old")
    rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_text("new")
    monkeypatch.undo()
    assert len(calls) >= 2 and (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_remove_stale_temporaries(tmp_path):
    run = tmp_path / "run"
    make_dir(run / "step-00000010", "step 10")
    make_dir(run / ".step-00000020.tmp-ab12cd34", "half-written")  # killed while writing step 20
    make_dir(run / ".step-00000030.tmp-killed", "half-written")
    make_dir(run / ".final.tmp-x_9y8z7w", "half-written")
    make_dir(run / ".step-00000010.old-123", "stale")  # killed while deleting what step-00000010 replaced
    make_dir(run / ".best.old-456", "the only copy")  # killed between the renames: best/ is missing
    (run / "metrics.csv").write_text("step\n1\n")
    (run / ".notes.tmp-file").write_text("a user's file, not a directory")
    make_dir(run / ".cache", "not ours")
    removed = checkpoint.remove_stale_temporaries(run)
    assert sorted(p.name for p in removed) == [".final.tmp-x_9y8z7w", ".step-00000010.old-123",
                                                ".step-00000020.tmp-ab12cd34", ".step-00000030.tmp-killed"]
    assert sorted(p.name for p in run.iterdir()) == [".cache", ".notes.tmp-file", "best", "metrics.csv",
                                                     "step-00000010"]
    assert (run / "best" / "state" / "train_state.pt").read_text() == "the only copy"
    assert (run / "step-00000010" / "model.safetensors").read_text() == "step 10"
    assert checkpoint.remove_stale_temporaries(run) == []  # nothing left to do
    assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == []  # a fresh run has no out_dir yet


# data_prep: no input left after filtering


def test_train_tokenizer_on_nothing_readable_keeps_the_tokenizer(good, tmp_path):
    corpus = write_latin1_corpus(tmp_path / "latin1")
    before = digest(good / "tokenizer")
    line = error_line([sys.executable, "-m", "data_prep.train_tokenizer", "--inputs", str(corpus),
                       "--out_dir", str(good / "tokenizer"), "--vocab_size", str(VOCAB)])
    assert "no text" in line and str(corpus / "latin1_0.py") in line
    assert digest(good / "tokenizer") == before
    assert not list(good.glob(".tokenizer.*"))


def test_prepare_text_on_nothing_readable_keeps_the_dataset(good, tmp_path):
    corpus = write_latin1_corpus(tmp_path / "latin1", n_files=2)  # two: one goes to each split, both written
    before = digest(good / "chunks")
    assert prepare_text.count(good / "chunks" / "train")[0] > 0  # a real dataset to lose
    line = error_line([sys.executable, "-m", "data_prep.prepare_text", "--inputs", str(corpus),
                       "--tokenizer_dir", str(good / "tokenizer"), "--out_dir", str(good / "chunks"),
                       "--workers", "1"])
    assert "no documents" in line and str(corpus / "latin1_") in line
    assert digest(good / "chunks") == before
    assert sorted(p.name for p in (good / "chunks").iterdir()) == ["train", "val"]


def test_an_empty_input_directory_is_named_whole(tmp_path):
    (tmp_path / "empty").mkdir()  # (prepare_text.py finds its files with the same corpus.find_files)
    line = error_line([sys.executable, "-m", "data_prep.train_tokenizer", "--inputs", str(tmp_path / "empty"),
                       "--out_dir", str(tmp_path / "out")])
    assert "no input files" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "out").exists()
