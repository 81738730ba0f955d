"""Convert our checkpoint directory back to a Hugging Face model directory that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with no custom code.

    python -m convert.to_hf out/pretrain/final --out_dir hf_export
"""

import json
import sys
from argparse import ArgumentError
from collections import defaultdict
from pathlib import Path

from jsonargparse import CLI
from safetensors.torch import save_file

from checkpoint import atomic_directory, check_writable_directory, copy_tokenizer_files, load_config, load_state_dict, \
    read_json, WEIGHTS
from convert.families import FAMILIES, config_to_hf, hf_name, join_fused
from model import InputError


def convert(checkpoint_dir: Path, *, out_dir: Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of a checkpoint as a HF model directory.

    Args:
        checkpoint_dir: our checkpoint directory (model.safetensors + model_config.yaml).
        out_dir: the Hugging Face directory to write (replaced atomically when complete).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_writable_directory(out_dir, reads=[checkpoint_dir])
    config = load_config(checkpoint_dir)
    hf_config = config_to_hf(config)
    family = FAMILIES[config.hf_model_type]
    state = load_state_dict(checkpoint_dir / WEIGHTS)

    hf_state, fused = {}, defaultdict(dict)
    for ours, tensor in state.items():
        name, part = hf_name(family, ours)
        if part is None:
            hf_state[name] = tensor.contiguous()
        else:
            fused[name][part] = tensor
    for name, parts in fused.items():
        hf_state[name] = join_fused(family, parts, config)
    dtype = next(iter(state.values())).dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    # Special token ids live in generation_config.json (copied from the source model); stating them, even as
    # null, keeps transformers' per-class defaults (e.g. Phi-3's pad id 32000) from pointing past the vocabulary.
    generation = read_json(checkpoint_dir / "generation_config.json", missing_ok=True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[key] = generation.get(key)

    with atomic_directory(out_dir) as tmp:
        save_file(hf_state, tmp / "model.safetensors", metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        copy_tokenizer_files(checkpoint_dir, tmp)
    return out_dir


if __name__ == "__main__":
    try:
        CLI(convert, as_positional=True, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
