"""Convert a Hugging Face model directory into our checkpoint directory.

    python -m convert.from_hf checkpoints/hf/HuggingFaceTB/SmolLM2-135M --out_dir checkpoints/HuggingFaceTB/SmolLM2-135M
    python -m convert.from_hf HF_DIR --out_dir DIR --dtype bfloat16

Reads config.json and the weights as stored on disk: model.safetensors, sharded safetensors with their
index, or pytorch_model*.bin (loaded with weights_only=True, so a pickle cannot run code). Copies the
tokenizer files. Supported: the model_types in convert/families.py.
"""

import sys
from argparse import ArgumentError
from collections import defaultdict
from pathlib import Path

import torch
from jsonargparse import CLI
from safetensors import SafetensorError, safe_open

from checkpoint import check_writable_directory, read_json, save_checkpoint
from convert.families import config_from_hf, family_for, hf_name, is_ignored, split_fused
from model import GPT, InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(hf_dir: Path, *, out_dir: Path, dtype: str | None = None) -> Path:
    """Convert a Hugging Face model directory into our checkpoint directory.

    Args:
        hf_dir: directory with config.json and the weights (safetensors, sharded, or pytorch_model*.bin).
        out_dir: the checkpoint directory to write (replaced atomically when the conversion succeeds).
        dtype: cast the weights to float32, bfloat16 or float16; default: keep the stored dtype.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_writable_directory(out_dir, reads=[hf_dir])
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    hf_config = read_json(hf_dir / "config.json")
    config = config_from_hf(hf_config, str(hf_dir / "config.json"))
    config.name = hf_dir.name
    family = family_for(hf_config, str(hf_dir / "config.json"))
    hf_tensors = HFWeights(hf_dir)

    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    # Which of our tensors come from which HF tensor; fused HF tensors feed several of ours.
    sources = defaultdict(dict)  # hf name -> {part or None: our name}
    for ours in expected:
        name, part = hf_name(family, ours)
        sources[name][part] = ours

    state = {}
    for name, parts in sources.items():
        tensor = hf_tensors.get(name)
        if None in parts:
            state[parts[None]] = tensor
        else:
            for part, t in split_fused(family, tensor, config, set(parts)).items():
                state[parts[part]] = t
    for ours, shape in expected.items():
        if state[ours].shape != shape:
            raise InputError(f"{hf_tensors.file_of(hf_name(family, ours)[0])}: {hf_name(family, ours)[0]} has shape "
                             f"{tuple(state[ours].shape)}, config.json implies {tuple(shape)}")
    leftover = [k for k in hf_tensors.names() if k not in sources and not is_ignored(family, k)
                and not (config.tie_embeddings and k == hf_name(family, "lm_head.weight")[0])]
    if leftover:
        raise InputError(f"{hf_tensors.file_of(leftover[0])}: {len(leftover)} tensor(s) that model_type "
                         f"{family.model_type!r} does not use, e.g. {leftover[0]!r}")
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    return save_checkpoint(out_dir, config, state, tokenizer_dir=hf_dir,
                           metadata={"converted_from": hf_dir.name, "hf_model_type": family.model_type})


class HFWeights:
    """The tensors of a HF directory by name, read from whichever file holds them."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        index = next((hf_dir / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (hf_dir / n).is_file()), None)
        if index is not None:
            self.where = {k: hf_dir / f for k, f in read_json(index).get("weight_map", {}).items()}
        else:
            single = next((hf_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (hf_dir / n).is_file()), None)
            if single is None:
                raise InputError(f"{hf_dir}: no weights found (expected model.safetensors, "
                                 "model.safetensors.index.json or pytorch_model.bin)")
            self.where = {k: single for k in self._open(single).keys()}
        self.opened = {}

    def names(self):
        return self.where.keys()

    def file_of(self, name: str) -> Path:
        return self.where.get(name, self.hf_dir)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise InputError(f"{self.hf_dir}: tensor {name!r} is missing from the weights")
        path = self.where[name]
        if path not in self.opened:
            self.opened[path] = self._open(path)
        handle = self.opened[path]
        try:
            return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        except (SafetensorError, KeyError) as e:
            raise InputError(f"{path}: cannot read {name!r} ({str(e).splitlines()[0]})") from None

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise InputError(f"{path}: listed in the index but not found")
        if path.suffix == ".safetensors":
            try:
                return safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        try:
            # weights_only refuses any pickle that would construct arbitrary objects or call code
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same to a user
            raise InputError(f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0]})") from None


if __name__ == "__main__":
    try:
        CLI(convert, as_positional=True, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
