"""The real SmolLM2-135M-Instruct, offline (see conftest.smollm2_hf_dir): our conversion, model and
tokenizer against transformers on the same files."""

import pytest
import torch

from checkpoint import load_model
from convert import from_hf
from model import Config
from tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Bonjour, comment ça va ? 🙂"]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    from_hf.convert(smollm2_hf_dir, out_dir=out)
    return smollm2_hf_dir, out


def test_logits_equal_transformers(smollm2):
    from transformers import AutoModelForCausalLM
    hf_dir, ours_dir = smollm2
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = load_model(ours_dir)
    # the converted config equals our preset; GGUF stores rms_norm_eps as float32 (9.9999997e-06), hence approx
    converted, preset = model.config.to_dict(), Config.from_name("SmolLM2-135M-Instruct").to_dict()
    assert converted.pop("norm_eps") == pytest.approx(preset.pop("norm_eps"), rel=1e-6)
    assert converted | {"name": ""} == preset | {"name": ""}
    tok = Tokenizer(ours_dir)
    for prompt in PROMPTS:
        idx = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            # 30 layers in float32: summation order differences stay far below 1e-4 (measured max ~1e-5)
            torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_and_chat_template_equal_transformers(smollm2):
    from transformers import AutoTokenizer
    hf_dir, ours_dir = smollm2
    ours, theirs = Tokenizer(ours_dir), AutoTokenizer.from_pretrained(hf_dir)
    for text in PROMPTS + ["<|im_start|>user\nHi<|im_end|>\n", "   spaces\n\n\ttabs"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    assert ours.eos_id == theirs.eos_token_id and ours.stop_ids == [theirs.eos_token_id]
