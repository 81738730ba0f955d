"""Fold a LoRA adapter into its base model, giving a plain checkpoint directory that every script reads.

    python -m convert.merge_lora --lora_dir out/lora/final --out_dir checkpoints/my-model-merged
    python -m convert.merge_lora --lora_dir out/lora/final --out_dir merged --base_dir checkpoints/SmolLM2-135M

The base is the checkpoint named in the adapter's lora_config.yaml (base_checkpoint_dir) unless --base_dir names
another. The merge is computed in float32 and written in the dtypes the base stores. An adapter trained on a quantised
base (QLoRA) merges into the float base here: the standard practice, though not bit-exact to what it trained against.
Tokenizer files come from the adapter directory (a LoRA run copies them there), else from the base.
"""

import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI

from checkpoint import LORA_CONFIG, check_writable_directory, load_lora, load_lora_config, load_model, save_checkpoint
from model import InputError, add_lora, merge_lora


def merge(*, lora_dir: Path, out_dir: Path, base_dir: Path | None = None) -> Path:
    """Merge a LoRA adapter into its base checkpoint.

    Args:
        lora_dir: the adapter directory (lora.safetensors, lora_config.yaml, tokenizer files).
        out_dir: the checkpoint directory to write (replaced atomically when the merge succeeds).
        base_dir: the base checkpoint; default: base_checkpoint_dir from lora_config.yaml.
    """
    lora_dir, out_dir = Path(lora_dir), Path(out_dir)
    lora_config, base_dir = load_lora_config(lora_dir, base_dir)
    check_writable_directory(out_dir, reads=[lora_dir, base_dir])
    model = load_model(base_dir)  # as stored: its dtypes are the ones to write back
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.float()
    try:
        add_lora(model, lora_config)
    except ValueError as e:  # e.g. lm_head on a base with tied embeddings
        raise InputError(f"{lora_dir / LORA_CONFIG}: {e}") from None
    load_lora(model, lora_dir)
    merge_lora(model)
    state = {k: v.to(dtypes[k]) for k, v in model.state_dict().items()}
    tokenizer_dir = lora_dir if (lora_dir / "tokenizer.json").is_file() else base_dir
    save_checkpoint(out_dir, model.config, state, tokenizer_dir=tokenizer_dir,
                    metadata={"merged_lora": str(lora_dir), "base_checkpoint_dir": str(base_dir)})
    print(f"merged {lora_dir} (r={lora_config.r}, targets {','.join(lora_config.targets)}) into {base_dir} "
          f"-> {out_dir}")
    return out_dir


if __name__ == "__main__":
    try:
        CLI(merge, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
