"""Fidelity: every supported family converts from transformers and back, with equal logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import TINY_CONFIGS, save_hf_model

from checkpoint import load_model
from conftest import ROOT
from convert import from_hf, to_hf

# float32 on CPU: our ops and transformers' differ only in summation order (max |delta| measured: 1.5e-6, Mixtral)
TOL = dict(atol=1e-5, rtol=1e-5)
FAMILIES = list(TINY_CONFIGS)
# Families whose forward runs the very ops transformers runs, in the same order: their logits are bit-identical (the
# README says so). Mixtral's experts, Phi-2's and Pythia's parallel residuals add in another order: within TOL.
BITWISE = {"llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "phi3"}


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_model = save_hf_model(family, root / "hf")
    from_hf.convert(root / "hf", out_dir=root / "ours")
    return family, hf_model, root


def test_logits_match_transformers(converted):
    family, hf_model, root = converted
    model = load_model(root / "ours")
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    torch.testing.assert_close(ours, theirs, **(dict(atol=0, rtol=0) if family in BITWISE else TOL))


def test_kv_cache_decode_equals_full_forward(converted):
    family, hf_model, root = converted
    model = load_model(root / "ours")
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    prefill = 10  # longer than the tiny sliding windows (8), so the window also cuts into the cache
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        steps = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, idx.shape[1]):
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_round_trip_reproduces_tensors_and_transformers_loads_it(converted):
    family, hf_model, root = converted
    to_hf.convert(root / "ours", out_dir=root / "back")
    original, back = load_file(root / "hf" / "model.safetensors"), load_file(root / "back" / "model.safetensors")
    if hf_model.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert sorted(back) == sorted(original)
    for name in original:
        assert torch.equal(back[name], original[name]), name

    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(root / "back").eval()
    assert type(reloaded) is type(hf_model)
    idx = torch.randint(0, hf_model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, hf_model(idx).logits, atol=0, rtol=0)


def test_sharded_safetensors_and_bin(tmp_path):
    hf_model = save_hf_model("llama", tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    os.replace(tmp_path / "pytorch_model.bin", tmp_path / "bin" / "pytorch_model.bin")
    hf_model.config.save_pretrained(tmp_path / "bin")
    idx = torch.randint(0, 128, (1, 16))
    for source in ("sharded", "bin"):
        from_hf.convert(tmp_path / source, out_dir=tmp_path / f"{source}-ours")
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / f"{source}-ours")(idx), hf_model(idx).logits, **TOL)


def test_dtype_flag(tmp_path):
    save_hf_model("qwen2", tmp_path / "hf")
    from_hf.convert(tmp_path / "hf", out_dir=tmp_path / "ours", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "ours" / "model.safetensors").values())


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_converts(tmp_path):
    save_hf_model("phi", tmp_path / "hf")
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    assert {"model.safetensors", "model_config.yaml"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    result = run_cli("-m", "convert.to_hf", str(tmp_path / "ours"), "--out_dir", str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["PhiForCausalLM"]


def test_unsupported_architecture_names_supported_ones(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "FalconForCausalLM", "config.json", "llama", "gemma2", "gpt_neox")
    assert not (tmp_path / "out").exists()


def test_missing_weights(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "no weights found", str(tmp_path / "hf"))
    assert not (tmp_path / "out").exists()


def test_truncated_weights(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_config_weights_shape_mismatch(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 80  # the stored MLP is 96 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "model.safetensors", "shape", "config.json")
    assert not (tmp_path / "out").exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    payload = RunsCode()
    payload.marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": payload}, tmp_path / "hf" / "pytorch_model.bin")
    result = run_cli("-m", "convert.from_hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "pytorch_model.bin", "refused")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_to_hf_on_a_directory_that_is_no_checkpoint(tmp_path):
    result = run_cli("-m", "convert.to_hf", str(tmp_path), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "model_config.yaml")
