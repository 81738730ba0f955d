"""The checkpoint directory every script reads and writes (see DESIGN.md):

    DIR/model.safetensors   weights, our parameter names
    DIR/model_config.yaml   the Config that builds the model
    DIR/tokenizer.json      + tokenizer_config.json, generation_config.json, chat_template.jinja when present

A LoRA adapter directory (save_lora, load_lora_model) holds lora.safetensors (only the lora_* tensors),
lora_config.yaml (the LoRAConfig fields and base_checkpoint_dir, the checkpoint it was trained on) and the tokenizer.

Writes go to a temporary sibling directory that is renamed into place once complete, so a killed
process never leaves a half-written checkpoint under the final name.
"""

import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import Config, GPT, InputError, LoRAConfig, add_lora, is_lora_key, lora_state_dict, merge_lora

# --precision (Fabric's names) -> the dtype a checkpoint's weights are loaded in: float32 under the mixed precisions,
# whose autocast computes in the half type
PRECISIONS = {"32-true": torch.float32, "bf16-mixed": torch.float32, "16-mixed": torch.float32,
              "bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"
LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def weights_dtype(precision: str, allowed: tuple[str, ...] = tuple(PRECISIONS)) -> torch.dtype:
    """The dtype to load a checkpoint's weights in for --precision, one of `allowed`."""
    require(precision in allowed, "--precision", repr(precision), f"one of {', '.join(allowed)}")
    return PRECISIONS[precision]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of --precision run in: the half type of a mixed precision, else the weights'."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision) or weights_dtype(precision)


def require(ok: bool, flag: str, value, expected: str) -> None:
    """A flag's value that makes no sense, checked where the flag is declared: '--train.lr -0.01: expected ...'."""
    if not ok:
        raise InputError(f"{flag} {value}: expected {expected}")


def read_json(path: str | Path, missing_ok: bool = False) -> dict:
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None


def read_chunk_index(chunk_dir: str | Path) -> dict:
    """The index.json of a litdata chunk directory, read before litdata reads it: a missing or corrupt index is one
    line naming the file, not a traceback from inside litdata."""
    path = Path(chunk_dir) / "index.json"
    if not path.is_file():
        raise InputError(f"{chunk_dir}: no litdata chunks here (index.json missing); prepare the data first, "
                         "e.g. python -m data_prep.prepare_stdlib")
    index = read_json(path)
    if not isinstance(index, dict) or "chunks" not in index:
        raise InputError(f"{path}: not a litdata index (no chunks); prepare it again")
    return index


def load_config(checkpoint_dir: str | Path) -> Config:
    path = Path(checkpoint_dir) / CONFIG
    if not path.is_file():
        raise InputError(f"{path}: not found; a checkpoint directory holds {WEIGHTS} and {CONFIG}")
    try:
        return Config.from_file(path)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: {e}".splitlines()[0]) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        return load_file(path)  # memory-mapped: tensors are read when first touched
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: str | None = None, compute_dtype: torch.dtype | None = None) -> GPT:
    """Build the model on the meta device (no memory, no init) and assign the stored tensors to it, in `dtype`.

    quantize: a quantize.MODES key (bitsandbytes). The float weights are read on the CPU and each projection is
    packed on its way to `device`, so that the float model never has to fit there; the rest then moves there.
    compute_dtype: what 4-bit layers dequantise to for their matmuls (None: the activations' dtype)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    state = load_state_dict(checkpoint_dir / WEIGHTS)
    check_state_dict(model, state, checkpoint_dir / WEIGHTS)
    load_on = "cpu" if quantize else device
    state = {k: v.to(device=load_on, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.init_rope_cache(torch.device(load_on))
    if quantize:
        from quantize import MODES, quantize_model  # bitsandbytes only when asked for

        if quantize not in MODES:
            raise InputError(f"quantize mode {quantize!r}: expected one of {', '.join(MODES)}")
        quantize_model(model, quantize, compute_dtype=compute_dtype, device=device).to(device)
        # Tensors that stayed on the CPU (embedding, norms) are views of the memory-mapped checkpoint file, whose
        # pages that quantisation read would stay resident with them: copy them out, and the mapping goes.
        for p in model.parameters():
            if p.device.type == "cpu" and p.is_floating_point():
                p.data = p.data.clone()
    return model


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, lora: bool = False) -> None:
    """InputError naming path unless state has exactly the model's tensors (lora: its adapter's), in their shapes."""
    expected = {k: v.shape for k, v in (lora_state_dict(model) if lora else model.state_dict()).items()}
    source = f"{LORA_CONFIG} and the base model" if lora else CONFIG
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"{path}: does not match {source}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise InputError(f"{path}: {k} has shape {tuple(state[k].shape)}, {source} implies {tuple(shape)}")


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
    disappears and out_dir is untouched.

    An existing out_dir is replaced in two renames, out_dir -> .NAME.old-PID and tmp -> out_dir, then the old one
    is removed. A process killed between the two renames leaves no out_dir, only .NAME.old-PID: the next
    atomic_directory(out_dir) renames it back first (and remove_stale_temporaries, which training scripts run on
    resume, does it for a whole run directory), so a kill never loses the previous contents. One writer per
    out_dir: only rank 0 writes checkpoints.
    """
    out_dir = Path(out_dir)
    check_writable_directory(out_dir)  # before anything is created or renamed
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_replaced(out_dir)
    tmp = make_temporary_sibling(out_dir)
    old = None
    try:
        yield tmp
        for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            if os.path.lexists(old):  # left by an earlier process with our pid: stale, since out_dir exists
                remove_tree(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(old) and not os.path.lexists(out_dir):  # the second rename failed: undo
            os.rename(old, out_dir)
        raise
    if old is not None:
        # the new directory is in place: a failure or kill here leaves only a stale .old-PID beside it, which
        # remove_stale_temporaries deletes
        remove_tree(old)


def make_temporary_sibling(out_dir: Path) -> Path:
    """An empty directory .NAME.tmp-XXXXXXXX beside out_dir, made with the default permissions (the umask's), not
    tempfile.mkdtemp's owner-only ones: a checkpoint or dataset that a team shares stays readable."""
    while True:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # a name already taken (2^32 of them): draw another
            continue


def check_writable_directory(out_dir: Path, reads: Iterable[str | Path | None] = ()) -> None:
    """InputError if out_dir, or the nearest of its parents that exists, is something other than a directory
    (a file, or a link to one): replacing a user's file with a directory would lose it. Also if out_dir is one of
    the paths in `reads` (what the run reads) or holds one: replacing it would delete the run's own input."""
    out_dir = Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if os.path.lexists(path):
            if not path.is_dir():
                raise InputError(f"{path}: exists and is not a directory; move it away or choose another "
                                 "output directory")
            break
    target = out_dir.resolve()
    for source in (Path(p) for p in reads if p is not None):
        if source.resolve() == target or target in source.resolve().parents:
            raise InputError(f"{out_dir}: would replace {source}, which this run reads; choose another output "
                             "directory")


# The names atomic_directory gives its siblings of NAME: random characters (8 hex now, mkdtemp's 8 before), the pid
TMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-\w+")
OLD_NAME = re.compile(r"\.(?P<name>.+)\.old-\d+")


def restore_replaced(out_dir: Path) -> Path | None:
    """If a writer was killed between atomic_directory's two renames (out_dir missing, .NAME.old-PID present), rename
    the old directory back to out_dir and return it. Of several (one killed writer after another), the newest."""
    if os.path.lexists(out_dir) or not out_dir.parent.is_dir():
        return None
    olds = [p for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.old-*")
            if p.is_dir() and OLD_NAME.fullmatch(p.name) and OLD_NAME.fullmatch(p.name)["name"] == out_dir.name]
    if not olds:
        return None
    old = max(olds, key=lambda p: p.stat().st_mtime)
    os.rename(old, out_dir)
    return old


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Clean up after writers killed inside atomic_directory in out_dir (a run directory), and return what was removed.

    First each .NAME.old-PID whose NAME is missing is renamed back to NAME (the previous contents, see
    atomic_directory). Then every remaining .NAME.old-PID (NAME exists: a kill while deleting the old one) and every
    .NAME.tmp-XXXXXXXX (a half-written checkpoint, e.g. .step-00001000.tmp-ab12cd34 or .final.tmp-...) directory
    is deleted. Only direct children that are directories with exactly these names are touched. Call it on rank 0
    only, before the run writes anything, and never while another process writes into out_dir: its temporaries
    would look stale.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    for path in sorted(out_dir.iterdir()):
        match = OLD_NAME.fullmatch(path.name)
        if match and path.is_dir():  # is_dir: False once an earlier restore has renamed it
            restore_replaced(out_dir / match["name"])
    removed = []
    for path in sorted(out_dir.iterdir()):
        # an .old may be the user's symlink that out_dir/NAME was (its target is not ours to delete), a .tmp never is
        if (OLD_NAME.fullmatch(path.name) and path.is_dir()
                or TMP_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink()):
            remove_tree(path)
            removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a directory we own; a symlink only as a link (an out_dir may have been a link to the user's data)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)  # best effort: what is left is found again by the next cleanup


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
        raise InputError(f"{path}: not found; a LoRA directory holds {LORA_WEIGHTS} and {LORA_CONFIG}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of LoRAConfig fields and base_checkpoint_dir")
    base = data.pop("base_checkpoint_dir", None)
    if not base and base_dir is None:
        raise InputError(f"{path}: base_checkpoint_dir is missing (the checkpoint the adapter was trained on)")
    unknown = sorted(set(data) - {f.name for f in fields(LoRAConfig)})
    if unknown:
        raise InputError(f"{path}: unknown LoRAConfig field(s) {unknown}")
    try:
        config = LoRAConfig(**data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: {e}".splitlines()[0]) from None
    if base_dir is not None:
        base_dir = Path(base_dir)
        if not (base_dir / CONFIG).is_file():
            raise InputError(f"{base_dir / CONFIG}: not found; the base of {lora_dir} must be a checkpoint "
                             "directory")
        return config, base_dir
    if not (Path(base) / CONFIG).is_file():
        raise InputError(f"{path}: base_checkpoint_dir {base} is not a checkpoint directory (no {CONFIG}); "
                         "name the base checkpoint explicitly")
    return config, Path(base)


def load_lora(model: GPT, lora_dir: str | Path) -> None:
    """Copy lora.safetensors into a model that add_lora prepared with the adapter's LoRAConfig (the tensors take
    the dtype and device of the model's LoRA parameters)."""
    path = Path(lora_dir) / LORA_WEIGHTS
    state = load_state_dict(path)
    check_state_dict(model, state, path, lora=True)
    model.load_state_dict(state, strict=False)  # strict=False: the base tensors are not in the adapter


def load_lora_model(lora_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    base_dir: str | Path | None = None, quantize: str | None = None) -> tuple[GPT, Path]:
    """The adapter's base (base_checkpoint_dir from lora_config.yaml, or base_dir), quantised with `quantize`
    (a quantize.MODES key) if given, with the adapter on top and not merged; and the base directory used."""
    lora_config, base_dir = load_lora_config(lora_dir, base_dir)
    model = load_model(base_dir, device=device, dtype=dtype, quantize=quantize, compute_dtype=dtype)
    try:
        add_lora(model, lora_config)
    except ValueError as e:  # e.g. lm_head on a base with tied embeddings
        raise InputError(f"{Path(lora_dir) / LORA_CONFIG}: {e}") from None
    load_lora(model, lora_dir)
    return model, base_dir


def load_frozen(checkpoint_dir: str | Path, device, dtype, quantize: str | None = None,
                compute_dtype: torch.dtype | None = None) -> GPT:
    """A checkpoint, or an adapter merged into its base, frozen in eval mode: a reference model. quantize: its
    projections then packed by bitsandbytes (quantize.MODES) on the device, 4-bit ones computing in compute_dtype."""
    checkpoint_dir = Path(checkpoint_dir)
    load_on = "cpu" if quantize else device  # the float weights stay on the CPU; only the packed ones go to device
    if (checkpoint_dir / LORA_CONFIG).is_file():
        model, _ = load_lora_model(checkpoint_dir, device=load_on, dtype=dtype)
        merge_lora(model)  # before quantising: an adapter cannot be folded into packed weights
    else:
        model = load_model(checkpoint_dir, device=load_on, dtype=dtype)
    if quantize:
        from quantize import quantize_model  # bitsandbytes only when asked for
        quantize_model(model, quantize, compute_dtype=compute_dtype, device=device).to(device)
    return model.requires_grad_(False).eval()
