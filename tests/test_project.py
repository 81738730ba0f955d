"""The project's own promises: CI runs the README's test command, the README's default job works."""

import subprocess
import sys

from conftest import ROOT
from convert.selfcheck import PRESETS


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    return [line.split("#")[0].strip() for line in lines[start:start + 2]]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_readme_default_job_runs_in_fast_dev_mode(tmp_path):
    """The README's first command as written (after the install), with the training cut to a few steps."""
    steps = [c.strip() for c in readme_commands()[0].split("&&")[1:]]
    assert [s.split()[0] for s in steps] == [".venv/bin/python"] * len(steps)
    for step in steps:
        args = step.split()[1:]
        if args[0] == "pretrain.py":
            args += ["--fast_dev_run", "true", "--out_dir", str(tmp_path / "run")]
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_selfcheck_passes():
    result = subprocess.run([sys.executable, "convert/selfcheck.py"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(PRESETS)}/{len(PRESETS)} families passed" in result.stdout
