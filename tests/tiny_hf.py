"""Tiny random `transformers` models, one per supported family, built the way users' checkpoints are
saved (save_pretrained), with every tensor randomised so a mis-mapped weight cannot hide behind an
identity init. Shapes are small but keep each family's quirks switched on and visible at T=24:
GQA, partial rotary, sliding windows shorter than the sequence, softcaps that actually bend scores."""

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, rms_norm_eps=1e-5)),
    # Llama 3.1-style RoPE scaling with an original context short enough that all three bands occur
    "llama3": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                   rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                                    sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "phi": ("PhiConfig", dict(COMMON, partial_rotary_factor=0.4)),
    "phi3": ("Phi3Config", dict(COMMON, sliding_window=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, rotary_pct=0.25)),
}


def make_hf_model(family: str, seed: int = 0):
    class_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # norm scales around 1 (Gemma's around 0: it adds 1 itself)
                p.copy_(torch.rand_like(p) + (0.0 if family == "gemma2" else 0.5))
            else:
                p.normal_(0.0, 0.1)
    return model


def save_hf_model(family: str, path, seed: int = 0, **save_kwargs):
    model = make_hf_model(family, seed)
    model.save_pretrained(path, **save_kwargs)
    return model
