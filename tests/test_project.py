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


def test_readme_default_job_runs():
    job = readme_commands()[0].split("&&", 1)[1].strip()  # the part after the install
    assert job.startswith(".venv/bin/python ")
    result = subprocess.run([sys.executable, *job.split()[1:]], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(PRESETS)}/{len(PRESETS)} families passed" in result.stdout
