"""Write our checkpoint directory (or a LoRA adapter directory, merged first) as one GGUF file that llama.cpp and
transformers (`from_pretrained(dir, gguf_file=...)`) load: weights, architecture metadata and the tokenizer.

    python -m convert.to_gguf out/finetune/final --out model-f16.gguf --dtype f16
    python -m convert.to_gguf out/lora/final --out merged-q8_0.gguf --dtype q8_0      # a LoRA directory: merged first

Written with the `gguf` package (pip install 'gptkit[gguf]'), after llama.cpp's convert_hf_to_gguf.py: what a family
needs beyond renaming (the q/k row permutation of the llama architecture, Gemma's norm offset, Llama 3.1's rope_freqs)
is said where it happens. Families: llama (Llama 2/3.x, TinyLlama, SmolLM2), mistral (as llama, like llama.cpp),
qwen2 (Qwen2.5), qwen3, gemma2, phi3. Others are a one-line error and nothing is written.
"""

import functools
import math
import os
import secrets
import sys
import tempfile
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

import torch
from jsonargparse import CLI

try:
    import gguf
except ImportError:  # the optional extra: convert() says how to install it
    gguf = None

from checkpoint import LORA_CONFIG, WEIGHTS, check_writable_directory, load_config, load_state_dict, read_json
from convert.families import FAMILIES, UnsupportedModel, hf_name, join_fused
from model import Config, InputError

# our Config.hf_model_type -> llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES); llama.cpp runs Mistral as llama
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                 "phi3": "phi3"}
ACTIVATION = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "phi3": "silu", "gemma2": "gelu_tanh"}
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# tokenizer.json's Split regex -> llama.cpp's pre-tokenizer name (llama-vocab.cpp picks its regexes by this name)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def convert(checkpoint_dir: Path, *, out: Path, dtype: str = "f16", base_dir: Path | None = None) -> Path:
    """Write a checkpoint as a GGUF file.

    Args:
        checkpoint_dir: our checkpoint directory, or a LoRA adapter directory (lora_config.yaml), merged first.
        out: the .gguf file to write (written under a temporary name beside it, renamed when complete).
        dtype: f32, f16, bf16, q8_0, q4_0 or q4_1 for the 2-D weights; norms, biases and rope_freqs stay f32.
        base_dir: for a LoRA directory, the base checkpoint (default: base_checkpoint_dir in lora_config.yaml).
    """
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    # Every file of a checkpoint has another suffix, so a .gguf name can never replace what this run reads
    if out.suffix != ".gguf":
        raise InputError(f"--out {out}: must end in .gguf")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; name the .gguf file to write")
    if gguf is None:
        raise InputError("the gguf package is missing: pip install 'gptkit[gguf]' (or pip install gguf)")
    if (checkpoint_dir / LORA_CONFIG).is_file():
        from convert.merge_lora import merge

        with tempfile.TemporaryDirectory(prefix="to_gguf-") as tmp:
            merged = merge(lora_dir=checkpoint_dir, out_dir=Path(tmp) / "merged", base_dir=base_dir)
            return write_gguf(merged, out, dtype, name=checkpoint_dir.resolve().name)
    return write_gguf(checkpoint_dir, out, dtype, name=checkpoint_dir.resolve().name)


def write_gguf(checkpoint_dir: Path, out: Path, dtype: str, name: str) -> Path:
    config = load_config(checkpoint_dir)
    arch = check_supported(config)
    state = load_state_dict(checkpoint_dir / WEIGHTS)
    tensors = gguf_tensors(config, arch, state)  # what can fail is checked before a byte is written
    vocab = tokenizer_metadata(checkpoint_dir, config)

    check_writable_directory(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        # use_temp_file: each encoded tensor goes to a spooled temporary file, not into memory, until written
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
        add_model_metadata(writer, config, name, dtype)
        add_tokenizer_metadata(writer, vocab)
        for tensor_name, make in tensors.items():
            data, qtype = encode(make(), dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:  # contents on disk before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {out} ({arch}, {dtype}, {len(tensors)} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    return out


def check_supported(config: Config) -> str:
    t = config.hf_model_type
    if t not in ARCHITECTURES:
        raise UnsupportedModel(f"GGUF export of model type {t!r} is not supported; supported: "
                               f"{', '.join(sorted(ARCHITECTURES))}")
    if config.activation != ACTIVATION[ARCHITECTURES[t]]:
        raise UnsupportedModel(f"{t} with activation {config.activation!r}: llama.cpp's {ARCHITECTURES[t]} "
                               f"architecture computes {ACTIVATION[ARCHITECTURES[t]]}")
    if config.rotary_fraction != 1.0 and t != "phi3":
        raise UnsupportedModel(f"{t} with rotary_fraction {config.rotary_fraction}: llama.cpp rotates whole heads")
    if t in ("qwen2", "qwen3") and config.sliding_window is not None:
        raise UnsupportedModel(f"{t} with a sliding window: llama.cpp's {t} architecture has none")
    if t == "gemma2":
        # llama.cpp does not store query_pre_attn_scalar: it scales by 1/sqrt(head_dim), or for the 46-layer 27B by
        # 1/sqrt(n_embd / n_head) (llama-model.cpp, LLM_ARCH_GEMMA2)
        implied = config.n_embd // config.n_head if config.n_layer == 46 else config.head_dim
        if config.query_pre_attn_scalar != implied:
            raise UnsupportedModel(f"gemma2 with query_pre_attn_scalar {config.query_pre_attn_scalar}: llama.cpp "
                                   f"implies {implied} for this shape")
    if t == "mistral" and config.sliding_window is not None and config.sliding_window < config.block_size:
        # as llama.cpp's own converter: its llama architecture has no window; the model is exact up to the window
        print(f"note: llama.cpp runs mistral as llama, without the sliding window ({config.sliding_window}): "
              f"outputs equal ours up to {config.sliding_window} tokens", file=sys.stderr)
    return ARCHITECTURES[t]


def gguf_tensors(config: Config, arch: str, state: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """GGUF name -> a function that makes the tensor (float32, llama.cpp's layout), by way of the Hugging Face names
    that to_hf.py writes. Every name is checked here; each tensor is made only when written, one at a time, so that
    the export of a large model holds one tensor in memory beside the memory-mapped checkpoint."""
    family = FAMILIES[config.hf_model_type]
    hf_parts = {}  # HF name -> {part or None: our name}
    for ours in state:
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # no output.weight: llama.cpp (and transformers' GGUF loader) then tie it to token_embd
        name, part = hf_name(family, ours)
        hf_parts.setdefault(name, {})[part] = ours

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.n_layer)
    out = {}
    for name, parts in hf_parts.items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise UnsupportedModel(f"no GGUF name for tensor {name!r} of architecture {arch!r}")
        out[f"{gguf_name}.{suffix}"] = functools.partial(make_tensor, config, arch, base, parts, state)
    if config.rope_type == "llama3":
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        out[rope_freqs] = functools.partial(llama3_rope_factors, config)
    return out


def make_tensor(config: Config, arch: str, base: str, parts: dict, state: dict[str, torch.Tensor]) -> torch.Tensor:
    family = FAMILIES[config.hf_model_type]
    if None in parts:
        tensor = state[parts[None]].float()
    else:  # Phi-3's qkv_proj and gate_up_proj, fused as transformers stores them (llama.cpp's attn_qkv, ffn_up)
        tensor = join_fused(family, {p: state[ours].float() for p, ours in parts.items()}, config)
    if arch == "llama" and base.endswith(("q_proj", "k_proj")):
        # llama.cpp's llama architecture rotates adjacent pairs (x0, x1), HF layouts rotate the two halves of a
        # head: permute each head's rows so the pairs line up (convert_hf_to_gguf.py, LlamaModel.permute)
        tensor = permute(tensor, config.n_head if base.endswith("q_proj") else config.n_kv_head)
    if config.norm_offset and base.endswith(("norm", "layernorm")):
        tensor = tensor + config.norm_offset  # Gemma computes x * (1 + w); llama.cpp stores 1 + w
    return tensor


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: Config) -> torch.Tensor:
    """llama.cpp takes Llama 3.1 scaling as a rope_freqs tensor: per frequency, what the unscaled one is divided by
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors; the same bands as model.build_rope_cache)."""
    dim = config.rope_n_elem
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    wavelen = 2 * math.pi / inv_freq
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    smooth = (config.rope_original_block_size / wavelen - low) / (high - low)
    factors = torch.where(wavelen < config.rope_original_block_size / high, 1.0,
                          torch.where(wavelen > config.rope_original_block_size / low, config.rope_factor,
                                      1 / ((1 - smooth) / config.rope_factor + smooth)))
    return factors.float()


def encode(tensor: torch.Tensor, dtype: str):
    """(data, GGMLQuantizationType or None) for GGUFWriter.add_tensor. 1-D tensors (norms, biases, rope_freqs) stay
    float32, as in llama.cpp; a row length the quantisation block does not divide falls back to f16, as there."""
    x = tensor.contiguous().numpy()
    if x.ndim == 1 or dtype == "f32":
        return x, None
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    if dtype == "f16" or x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return x.astype("float16"), None
    return gguf.quants.quantize(x, qtype), qtype


def add_model_metadata(w, config: Config, name: str, dtype: str) -> None:
    w.add_name(name)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base)
    w.add_rope_dimension_count(config.rope_n_elem)
    w.add_vocab_size(config.vocab_size)
    if config.hf_model_type in ("phi3", "gemma2") and config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
    if config.attn_softcap is not None:
        w.add_attn_logit_softcapping(config.attn_softcap)
    if config.final_softcap is not None:
        w.add_final_logit_softcapping(config.final_softcap)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype])
    if dtype.startswith("q"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tokenizer_metadata(checkpoint_dir: Path, config: Config) -> dict:
    """The tokenizer as llama.cpp stores it, from tokenizer.json (+ tokenizer_config.json, generation_config.json)."""
    from tokenizer import Tokenizer

    tok = Tokenizer(checkpoint_dir)
    path = checkpoint_dir / "tokenizer.json"
    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"{path}: a {model.get('type')!r} tokenizer; GGUF export handles BPE (byte-level "
                               "or sentencepiece-style with byte fallback)")
    sentencepiece = bool(model.get("byte_fallback"))
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > config.vocab_size or max(vocab.values()) >= config.vocab_size:
        raise UnsupportedModel(f"{path}: {len(vocab)} tokens do not fit the model's vocab_size {config.vocab_size}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # sentencepiece-style scores: llama.cpp merges the pair whose joined piece scores highest; the merge rank of
    # the piece gives the order tokenizer.json's merges apply in
    rank = {}
    for i, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), i)

    T = gguf.TokenType
    tokens, scores, types = [], [], []
    by_id = {i: t for t, i in vocab.items()}
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding is padded past the tokenizer (e.g. Qwen2.5): as convert_hf_to_gguf.py
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(T.UNUSED)
            continue
        if sentencepiece and token == model.get("unk_token"):  # sentencepiece's own type, before "added"
            kind = T.UNKNOWN
        elif i in added:
            kind = T.CONTROL if added[i]["special"] else T.USER_DEFINED
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = T.BYTE
        else:
            kind = T.NORMAL
        tokens.append(token), types.append(kind)
        scores.append(-float(rank[token]) if token in rank else 0.0)

    plain, with_special = tok.backend.encode("a", add_special_tokens=False).ids, tok.backend.encode("a").ids
    unk = model.get("unk_token") or tok.unk_token
    pad_id = tok.token_to_id(tok.pad_token)
    if pad_id is None:
        pad_id = read_json(checkpoint_dir / "generation_config.json", missing_ok=True).get("pad_token_id")
    return dict(
        model="llama" if sentencepiece else "gpt2",
        pre=None if sentencepiece else pre_tokenizer_name(spec, path),
        tokens=tokens, scores=scores if sentencepiece else None, types=types, merges=merges,
        bos=tok.bos_id, eos=tok.eos_id, unk=tok.token_to_id(unk), pad=pad_id,
        add_bos=with_special[:1] == [tok.bos_id] and plain[:1] != [tok.bos_id],
        add_eos=with_special[-1:] == [tok.eos_id] and plain[-1:] != [tok.eos_id],
        add_space_prefix=adds_space_prefix(spec) if sentencepiece else False,
        chat_template=tok.chat_template,
    )


def pre_tokenizer_name(spec: dict, path: Path) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (it identifies them by name, not by regex)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM's hub tokenizer: single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[steps[0]["pattern"]["Regex"]]
    raise UnsupportedModel(f"{path}: pre-tokenizer {kinds} has no llama.cpp name that this exporter knows "
                           "(known: gpt-2, smollm, llama-bpe, qwen2)")


def adds_space_prefix(spec: dict) -> bool:
    """Whether a sentencepiece-style tokenizer prepends '▁' to the text (Metaspace, or a Prepend normalizer)."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
                return scheme != "never"
            if node.get("type") == "Prepend":
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))


def add_tokenizer_metadata(w, vocab: dict) -> None:
    w.add_tokenizer_model(vocab["model"])
    if vocab["pre"] is not None:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if vocab[key] is not None:
            getattr(w, f"add_{key}_token_id")(vocab[key])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    w.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])


if __name__ == "__main__":
    try:
        CLI(convert, as_positional=True, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
