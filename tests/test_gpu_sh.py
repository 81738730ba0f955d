"""bench/gpu.sh's plumbing on the CPU (GPU_SH_DRY=1: toy sizes, no install, no peer), so the GPU proof cannot rot
between the rare runs on a GPU: every part leaves its figures in gpu.json and gpu.md, and a part that fails or
runs past its limit is recorded as such while the rest still runs."""

import json
import math
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpu_sh(out: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_SH_DRY": "1", "OUT": str(out), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_failed_and_timed_out_parts_are_recorded_and_the_rest_runs(tmp_path):
    # decode fails on purpose and memory, which runs after it, hangs past a 3-second limit; the report is still
    # written (the slow test below runs every part)
    run = gpu_sh(tmp_path, GPU_SH_PARTS="decode memory", GPU_SH_FAIL="decode", GPU_SH_HANG="memory",
                 GPU_SH_LIMIT_MEMORY="3")
    assert run.returncode == 1, run.stdout + run.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    parts = doc["parts"]
    assert doc["dry"] is True and doc["env"]["torch"]
    assert parts["decode"]["status"] == "failed" and parts["decode"]["rc"] == 1
    assert parts["memory"]["status"] == "timed out" and parts["memory"]["limit_s"] == 3
    assert parts["pretrain"]["status"] == parts["cuda_tests"]["status"] == "not run"
    assert "GPU_SH_FAIL=decode: decode fails on purpose" in (tmp_path / "logs" / "decode.log").read_text()
    md = (tmp_path / "gpu.md").read_text()
    assert "| 3. decoding | failed |" in md and "| 4. memory | timed out |" in md
    assert "TIMED OUT after 3 s" in run.stdout and "FAILED, exit 1" in run.stdout


def test_a_run_without_cuda_fails_the_cuda_tests_outside_a_dry_run(tmp_path):
    # what gpu.sh sets outside its dry run: no GPU is then a failure, never fifteen skips
    env = {**os.environ, "GPU_SH_REQUIRE_CUDA": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "cuda", str(ROOT / "tests" / "test_cuda.py"), "-k", "cuda_is_there"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "sees no GPU" in run.stdout


def test_offline_python_is_python3_with_the_wheels_and_the_project(tmp_path):
    """The path of a GPU machine without internet whose python3 has a CUDA torch: .venv/bin/python runs that python3
    with the wheels of GPU_SH_WHEELS installed beside it (here one made on the spot) and the project importable."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    files = {"tiny_wheel_probe.py": "ANSWER = 42\n",
             "tiny_wheel_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tiny-wheel-probe\nVersion: 0.1\n",
             "tiny_wheel_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["tiny_wheel_probe-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files)
    with zipfile.ZipFile(wheels / "tiny_wheel_probe-0.1-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    # python3 is the project's venv here, as it is the image's venv on the GPU machine
    env = {**os.environ, "GPU_SH_WHEELS": str(wheels), "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "_wrap", str(tmp_path / "venv")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    probe = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                            "import tiny_wheel_probe, model, torch; print(tiny_wheel_probe.ANSWER, model.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["42", str(ROOT / "model.py")]


@pytest.mark.slow  # every part at toy sizes: a minute or two on 2 busy cores (importing lightning alone takes 5-20 s)
def test_dry_run_writes_every_parts_figures(tmp_path):
    run = gpu_sh(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    parts = doc["parts"]
    assert doc["env"]["device"].startswith("CPU") and doc["env"]["cuda"] is None
    assert parts["install"]["status"].startswith("skipped")
    for name in ("cuda_tests", "pretrain", "decode", "memory", "packing"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["cuda_tests"]["skipped"] and not parts["cuda_tests"]["passed"]  # no GPU here: skipped, with reason
    pretrain = parts["pretrain"]["results"]["ours"]
    assert pretrain["tokens_per_sec"] > 0 and 0 < pretrain["mfu"] < 1 and pretrain["micro_batch"] >= 1
    assert "no LitGPT" in parts["pretrain"]["errors"]["litgpt"]  # the dry run leaves the peer out: its column only
    decode = parts["decode"]["results"]
    for key in ("ours/b1", "ours+compile/b1", "ours/b8", "ours+compile/b8"):
        assert decode[key]["tokens_per_sec"] > 0 and decode[key]["ttft_ms"] > 0
    memory = parts["memory"]["results"]
    assert memory["qlora-nf4"]["trainable_params"] > 0 and memory["qlora-nf4"]["peak_rss_mb"] > 0
    assert memory["full-bf16-mixed"]["losses"] and all(math.isfinite(x) for x in memory["full-bf16-mixed"]["losses"])
    packing = parts["packing"]
    assert packing["documents"] > packing["micro_batch"]  # several documents a row
    for key in ("sdpa", "varlen", "causal"):
        assert packing["results"][key]["tokens_per_sec"] > 0
    assert "flex" in packing["skipped"]  # no FlexAttention backward on the CPU: recorded, not failed
    md = (tmp_path / "gpu.md").read_text()
    for heading in ("#### 1. CUDA tests", "#### 2. Pretraining throughput", "#### 3. Decoding", "#### 4. Memory",
                    "#### 5. Packing"):
        assert heading in md
    assert "| ours | 2 |" in md and "| 8 | ours+compile |" in md and "| qlora-nf4 Llama-3.1-8B bf16-true |" in md
    assert md in run.stdout  # gpu.sh prints the summary at the end
