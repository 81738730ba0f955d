"""The checkpoint directory every script reads and writes (see DESIGN.md):

    DIR/model.safetensors   weights, our parameter names
    DIR/model_config.yaml   the Config that builds the model
    DIR/tokenizer.json      + tokenizer_config.json, generation_config.json, chat_template.jinja when present

A LoRA adapter directory (save_lora, load_lora_model) holds lora.safetensors (only the lora_* tensors),
lora_config.yaml (the LoRAConfig fields and base_checkpoint_dir, the checkpoint it was trained on) and the tokenizer.

Writes go to a temporary sibling directory that is renamed into place once complete, so a killed
process never leaves a half-written checkpoint under the final name.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import GPT, Config, LoRAConfig, add_lora, is_lora_key, lora_state_dict

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"
LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


class CheckpointError(Exception):
    """Bad input a user can fix: scripts print it as one line and exit non-zero."""


def read_json(path: str | Path, missing_ok: bool = False) -> dict:
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def load_config(checkpoint_dir: str | Path) -> Config:
    path = Path(checkpoint_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a checkpoint directory holds {WEIGHTS} and {CONFIG}")
    try:
        return Config.from_file(path)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: {e}".splitlines()[0]) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return load_file(path)  # memory-mapped: tensors are read when first touched
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPT:
    """Build the model on the meta device (no memory, no init) and assign the stored tensors to it."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    state = load_state_dict(checkpoint_dir / WEIGHTS)
    check_state_dict(model, state, checkpoint_dir / WEIGHTS)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.init_rope_cache(torch.device(device))
    return model


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {CONFIG}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                              f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, {CONFIG} implies {tuple(shape)}")


def save_checkpoint(out_dir: str | Path, config: Config, state_dict: dict[str, torch.Tensor],
                    tokenizer_dir: str | Path | None = None, metadata: dict | None = None,
                    train_state: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically. metadata (e.g. the run's arguments) goes into the
    safetensors header as strings, so a checkpoint describes itself. train_state (optimizer, loader position,
    RNG, counters: tensors and plain values only, so it loads with weights_only=True) goes to state/."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, tmp / WEIGHTS, metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
        save_config(config, tmp / CONFIG)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if train_state is not None:
            (tmp / "state").mkdir()
            torch.save(train_state, tmp / "state" / "train_state.pt")
    return out_dir


def save_config(config: Config, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextmanager
def atomic_directory(out_dir: Path):
    """Yield a fresh temporary directory beside out_dir; on success it replaces out_dir, on error it
    disappears and out_dir is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_lora(out_dir: str | Path, lora_config: LoRAConfig, state_dict: dict[str, torch.Tensor],
              base_checkpoint_dir: str | Path, tokenizer_dir: str | Path | None = None, metadata: dict | None = None,
              train_state: dict | None = None) -> Path:
    """Write a LoRA adapter directory atomically: the adapter, its config with the path of its base, the tokenizer."""
    not_lora = [k for k in state_dict if not is_lora_key(k)]
    if not_lora:
        raise ValueError(f"save_lora: {len(not_lora)} tensor(s) that are not LoRA weights, e.g. {not_lora[0]!r}")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, tmp / LORA_WEIGHTS, metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
        data = {**asdict(lora_config), "targets": list(lora_config.targets),
                "base_checkpoint_dir": str(base_checkpoint_dir)}
        with open(tmp / LORA_CONFIG, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if train_state is not None:
            (tmp / "state").mkdir()
            torch.save(train_state, tmp / "state" / "train_state.pt")
    return out_dir


def load_lora_config(lora_dir: str | Path, base_dir: str | Path | None = None) -> tuple[LoRAConfig, Path]:
    """The adapter's LoRAConfig, and its base checkpoint directory: base_dir if given, else base_checkpoint_dir."""
    path = Path(lora_dir) / LORA_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a LoRA directory holds {LORA_WEIGHTS} and {LORA_CONFIG}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of LoRAConfig fields and base_checkpoint_dir")
    base = data.pop("base_checkpoint_dir", None)
    if not base and base_dir is None:
        raise CheckpointError(f"{path}: base_checkpoint_dir is missing (the checkpoint the adapter was trained on)")
    unknown = sorted(set(data) - {f.name for f in fields(LoRAConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown LoRAConfig field(s) {unknown}")
    try:
        config = LoRAConfig(**data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}".splitlines()[0]) from None
    if base_dir is not None:
        base_dir = Path(base_dir)
        if not (base_dir / CONFIG).is_file():
            raise CheckpointError(f"{base_dir / CONFIG}: not found; the base of {lora_dir} must be a checkpoint "
                                  "directory")
        return config, base_dir
    if not (Path(base) / CONFIG).is_file():
        raise CheckpointError(f"{path}: base_checkpoint_dir {base} is not a checkpoint directory (no {CONFIG}); "
                              "name the base checkpoint explicitly")
    return config, Path(base)


def load_lora(model: GPT, lora_dir: str | Path) -> None:
    """Copy lora.safetensors into a model that add_lora prepared with the adapter's LoRAConfig (the tensors take
    the dtype and device of the model's LoRA parameters)."""
    path = Path(lora_dir) / LORA_WEIGHTS
    state = load_state_dict(path)
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {LORA_CONFIG} and the base model: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''} unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, the base model implies "
                                  f"{tuple(shape)}")
    model.load_state_dict(state, strict=False)  # strict=False: the base tensors are not in the adapter


def load_lora_model(lora_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    base_dir: str | Path | None = None, quantize: str | None = None) -> tuple[GPT, Path]:
    """The adapter's base (base_checkpoint_dir from lora_config.yaml, or base_dir), quantised with `quantize`
    (a quantize.MODES key) if given, with the adapter on top and not merged; and the base directory used."""
    lora_config, base_dir = load_lora_config(lora_dir, base_dir)
    if quantize is None:
        model = load_model(base_dir, device=device, dtype=dtype)
    else:
        from quantize import MODES, quantize_model  # bitsandbytes only when asked for

        if quantize not in MODES:
            raise CheckpointError(f"unknown quantize mode {quantize!r}: expected one of {', '.join(MODES)}")
        # float weights stay on the CPU; each goes to the device alone, to be quantised there
        model = load_model(base_dir, device="cpu", dtype=dtype)
        quantize_model(model, quantize, compute_dtype=dtype, device=device).to(device)
    try:
        add_lora(model, lora_config)
    except ValueError as e:  # e.g. lm_head on a base with tied embeddings
        raise CheckpointError(f"{Path(lora_dir) / LORA_CONFIG}: {e}") from None
    load_lora(model, lora_dir)
    return model, base_dir
