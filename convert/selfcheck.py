"""A self-check of model.py and the converters that needs nothing but this repository: for one preset of
every supported family, shrunk to a few layers and randomly initialised, it checks that
  - our checkpoint -> Hugging Face directory -> our checkpoint reproduces every tensor exactly,
  - the reloaded model gives the same logits,
  - prefill + one-token decoding through the KV cache gives the logits of the full forward.

    python -m convert.selfcheck

(The comparison against transformers itself is in tests/test_convert.py.)
"""

import sys
import tempfile
from pathlib import Path

import torch
from jsonargparse import CLI

from checkpoint import load_model, load_state_dict, save_checkpoint
from convert import from_hf, to_hf
from model import GPT, Config

PRESETS = ["Llama-3.2-1B", "TinyLlama-1.1B-intermediate-step-1431k-3T", "Mistral-7B-v0.1", "Mixtral-8x7B-v0.1",
           "Qwen2.5-0.5B", "Qwen3-0.6B", "gemma-2-2b", "phi-2", "Phi-3-mini-4k-instruct", "pythia-160m",
           "SmolLM2-135M"]


def main(seq_len: int = 24, seed: int = 0) -> None:
    """Round-trip a shrunk copy of each family's preset and compare logits.

    Args:
        seq_len: tokens per test sequence (longer than the shrunk sliding windows of 8).
        seed: seed for the random weights and tokens.
    """
    torch.manual_seed(seed)
    print(f"{'preset':<44}{'round trip':>12}{'max |dlogits|':>15}{'kv cache |d|':>14}")
    failures = 0
    for name in PRESETS:
        config = shrink(Config.from_name(name))
        model = GPT(config).eval()
        with torch.no_grad():  # random norm scales and biases, so no mapping hides behind 1s and 0s
            for p in model.parameters():
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1)
        idx = torch.randint(0, config.vocab_size, (2, seq_len))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_checkpoint(tmp / "ours", config, model.state_dict())
            to_hf.convert(tmp / "ours", out_dir=tmp / "hf")
            from_hf.convert(tmp / "hf", out_dir=tmp / "back")
            before, after = load_state_dict(tmp / "ours" / "model.safetensors"), load_state_dict(
                tmp / "back" / "model.safetensors")
            exact = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            with torch.no_grad():
                logits = model(idx)
                delta = (load_model(tmp / "back")(idx) - logits).abs().max().item()
                cache_delta = (decode_with_cache(model, idx) - logits).abs().max().item()
        ok = exact and delta == 0.0 and cache_delta < 1e-4
        failures += not ok
        print(f"{name:<44}{'exact' if exact else 'DIFFERS':>12}{delta:>15.2e}{cache_delta:>14.2e}"
              f"{'' if ok else '  FAILED'}")
    print(f"{len(PRESETS) - failures}/{len(PRESETS)} families passed")
    if failures:
        sys.exit(1)


def shrink(config: Config) -> Config:
    """The same family with tiny shapes: every behaviour switch kept, the sizes cut."""
    mha = config.n_kv_head == config.n_head
    return Config(**{**config.to_dict(), "n_layer": 3, "n_embd": 64, "n_head": 4, "n_kv_head": 4 if mha else 2,
                     "head_dim": 16, "intermediate_size": 96, "vocab_size": 256, "block_size": 64,
                     "sliding_window": 8 if config.sliding_window else None,
                     "query_pre_attn_scalar": 16 if config.query_pre_attn_scalar else None})


def decode_with_cache(model: GPT, idx: torch.Tensor, prefill: int = 10) -> torch.Tensor:
    model.set_kv_cache(batch_size=idx.shape[0], max_seq_length=idx.shape[1])
    steps = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
    for t in range(prefill, idx.shape[1]):
        steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    model.clear_kv_cache()
    return torch.cat(steps, dim=1)


if __name__ == "__main__":
    CLI(main)
