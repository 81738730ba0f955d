"""The project's own promises: CI runs the README's test command, the README's default job works."""

import subprocess
import sys

import pytest

from conftest import ROOT
from convert.selfcheck import PRESETS


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    return [line.split("#")[0].strip() for line in lines[start:start + 2]]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


@pytest.mark.slow  # prepares the stdlib corpus from scratch: about a minute on 2 cores
def test_readme_default_job_runs_in_fast_dev_mode(tmp_path):
    """The README's first command as written (after the install), with the training cut to a few steps. Run in an
    empty directory, as on a fresh clone: data/, checkpoints/ and out/ are made there, so files left in the
    repository by an earlier run can neither help it pass nor be overwritten."""
    steps = [c.strip() for c in readme_commands()[0].split("&&")[1:]]
    assert [s.split()[0] for s in steps] == [".venv/bin/python"] * len(steps)
    for step in steps:
        # the repository's files by absolute path; every path the job writes stays relative, so inside tmp_path
        args = [str(ROOT / a) if (ROOT / a).is_file() else a for a in step.split()[1:]]
        if args[0].endswith("pretrain.py"):
            args += ["--fast_dev_run", "true"]
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "stdlib" / "train" / "index.json").is_file()
    assert (tmp_path / "out" / "pretrain" / "stdlib" / "final" / "model.safetensors").is_file()


def test_selfcheck_passes():
    result = subprocess.run([sys.executable, "-m", "convert.selfcheck"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(PRESETS)}/{len(PRESETS)} families passed" in result.stdout
