"""What from_hf.py and to_hf.py share: for each supported transformers architecture, how its
config.json maps to our Config and how its tensor names (as stored on disk) map to ours.

Dispatch is on config.json's `model_type`, never on a repository name.
"""

import re
from dataclasses import dataclass, field

import torch

from model import Config, InputError


class UnsupportedModel(InputError):
    pass


@dataclass
class Family:
    model_type: str
    architecture: str  # the class name transformers loads for config.json's "architectures"
    defaults: dict  # transformers' defaults for the config keys we read (configs omit default values)
    names: list  # (regex over our name, HF name template); a named group `part` marks a fused HF tensor
    fused: str | None = None  # layout of fused HF tensors: "stacked" (Phi-3) or "per_head" (GPT-NeoX)
    ignored: list = field(default_factory=list)  # regexes of HF keys that hold no weights (buffers)


LLAMA_NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.([qkvo])_proj\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.attn\.([qk])_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
GEMMA2_NAMES = [
    (r"layers\.(\d+)\.post_attn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"layers\.(\d+)\.post_mlp_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
] + LLAMA_NAMES
# transformers 5 fuses Mixtral's experts in memory but save_pretrained (and every hub checkpoint) keeps these
MIXTRAL_NAMES = [
    (r"layers\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.block_sparse_moe.gate.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", r"model.layers.\1.block_sparse_moe.experts.\2.w1.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", r"model.layers.\1.block_sparse_moe.experts.\2.w2.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", r"model.layers.\1.block_sparse_moe.experts.\2.w3.weight"),
] + LLAMA_NAMES
PHI_NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"model.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.attn\.o_proj\.(weight|bias)", r"model.layers.\1.self_attn.dense.\2"),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"model.layers.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"model.layers.\1.mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"model.final_layernorm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
]
PHI3_NAMES = [
    (r"layers\.(\d+)\.attn\.(?P<part>[qkv])_proj\.weight", r"model.layers.\1.self_attn.qkv_proj.weight"),
    (r"layers\.(\d+)\.mlp\.(?P<part>gate|up)_proj\.weight", r"model.layers.\1.mlp.gate_up_proj.weight"),
] + LLAMA_NAMES
NEOX_NAMES = [
    (r"embed\.weight", "gpt_neox.embed_in.weight"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"gpt_neox.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.mlp_norm\.(weight|bias)", r"gpt_neox.layers.\1.post_attention_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.(?P<part>[qkv])_proj\.(weight|bias)", r"gpt_neox.layers.\1.attention.query_key_value.\3"),
    (r"layers\.(\d+)\.attn\.o_proj\.(weight|bias)", r"gpt_neox.layers.\1.attention.dense.\2"),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"gpt_neox.layers.\1.mlp.dense_h_to_4h.\2"),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"gpt_neox.layers.\1.mlp.dense_4h_to_h.\2"),
    (r"norm\.(weight|bias)", r"gpt_neox.final_layer_norm.\1"),
    (r"lm_head\.weight", "embed_out.weight"),
]
ROTARY_BUFFERS = [r".*rotary_emb\.inv_freq"]

LLAMA_DEFAULTS = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      rope_theta=10000.0, hidden_act="silu", attention_bias=False, mlp_bias=False, head_dim=None,
                      num_key_value_heads=None, sliding_window=None)
FAMILIES = {f.model_type: f for f in [
    Family("llama", "LlamaForCausalLM", LLAMA_DEFAULTS, LLAMA_NAMES, ignored=ROTARY_BUFFERS),
    Family("mistral", "MistralForCausalLM",
           dict(LLAMA_DEFAULTS, max_position_embeddings=4096 * 32, sliding_window=4096, num_key_value_heads=8),
           LLAMA_NAMES, ignored=ROTARY_BUFFERS),
    Family("mixtral", "MixtralForCausalLM",
           dict(LLAMA_DEFAULTS, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, rope_theta=1e6,
                num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
           MIXTRAL_NAMES, ignored=ROTARY_BUFFERS),
    Family("qwen2", "Qwen2ForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=151936, max_position_embeddings=32768, use_sliding_window=False,
                max_window_layers=28, sliding_window=4096),
           LLAMA_NAMES, ignored=ROTARY_BUFFERS),
    Family("qwen3", "Qwen3ForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=151936, max_position_embeddings=32768, use_sliding_window=False,
                max_window_layers=28, sliding_window=4096, head_dim=128),
           LLAMA_NAMES, ignored=ROTARY_BUFFERS),
    Family("gemma2", "Gemma2ForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=256000, max_position_embeddings=8192, tie_word_embeddings=True,
                hidden_activation="gelu_pytorch_tanh", head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
           GEMMA2_NAMES, ignored=ROTARY_BUFFERS),
    Family("phi", "PhiForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=51200, layer_norm_eps=1e-5, hidden_act="gelu_new",
                partial_rotary_factor=0.5, qk_layernorm=False),
           PHI_NAMES, ignored=ROTARY_BUFFERS),
    Family("phi3", "Phi3ForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                partial_rotary_factor=1.0),
           PHI3_NAMES, fused="stacked", ignored=ROTARY_BUFFERS),
    Family("gpt_neox", "GPTNeoXForCausalLM",
           dict(LLAMA_DEFAULTS, vocab_size=50432, layer_norm_eps=1e-5, hidden_act="gelu", rotary_pct=0.25,
                rotary_emb_base=10000, use_parallel_residual=True, attention_bias=True),
           NEOX_NAMES, fused="per_head",
           # old Pythia checkpoints store the causal mask and rotary tables as weights
           ignored=ROTARY_BUFFERS + [r".*attention\.bias", r".*attention\.masked_bias"]),
]}

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}


def family_for(hf_config: dict, source: str) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        arch = (hf_config.get("architectures") or [model_type])[0]
        raise UnsupportedModel(f"{source}: unsupported architecture {arch!r} (model_type {model_type!r}); "
                               f"supported model_types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict, source: str = "config.json") -> Config:
    family = family_for(hf, source)
    # absent means transformers' default; an explicit null means off (e.g. Mistral's sliding_window: null)
    get = lambda key: hf[key] if key in hf else family.defaults.get(key)  # noqa: E731
    t = family.model_type
    try:
        n_head = hf["num_attention_heads"]
        kw = dict(
            hf_model_type=t, vocab_size=get("vocab_size"),
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"], head_dim=get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"], block_size=get("max_position_embeddings"),
            tie_embeddings=bool(get("tie_word_embeddings")),
            activation=ACTIVATIONS.get(get("hidden_activation" if t == "gemma2" else "hidden_act"), "unknown"),
            **rope_from_hf(hf, family),
        )
    except KeyError as e:
        raise UnsupportedModel(f"{source}: missing key {e.args[0]!r} for model_type {t!r}") from None
    if kw["activation"] == "unknown":
        raise UnsupportedModel(f"{source}: unsupported activation {get('hidden_act')!r}; supported: {sorted(ACTIVATIONS)}")
    if t not in ("phi", "gpt_neox"):  # the RMSNorm families
        kw.update(norm_eps=get("rms_norm_eps"))
    if t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"):
        kw.update(qkv_bias=bool(get("attention_bias")),
                  attn_out_bias=bool(get("attention_bias")), mlp_bias=bool(get("mlp_bias")))
    if t in ("mistral", "mixtral", "phi3"):
        kw.update(sliding_window=get("sliding_window"))
    if t == "mixtral":
        kw.update(mlp="moe", n_expert=get("num_local_experts"), n_expert_per_token=get("num_experts_per_tok"),
                  router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    if t == "qwen2":
        kw.update(qkv_bias=True, attn_out_bias=False)  # Qwen2 hard-codes bias on q/k/v only
    if t in ("qwen2", "qwen3") and get("use_sliding_window"):
        if get("max_window_layers") != 0:  # a window on layers >= max_window_layers: not one of our patterns
            raise UnsupportedModel(f"{source}: use_sliding_window with max_window_layers="
                                   f"{get('max_window_layers')} is not supported")
        kw.update(sliding_window=get("sliding_window"))
    if t == "qwen3":
        kw.update(qk_norm=True)
    if t == "gemma2":
        kw.update(norm_offset=1.0, post_block_norms=True, scale_embeddings=True,
                  query_pre_attn_scalar=get("query_pre_attn_scalar"), attn_softcap=get("attn_logit_softcapping"),
                  final_softcap=get("final_logit_softcapping"), sliding_window=get("sliding_window"),
                  sliding_window_period=2)
    if t == "phi":
        if get("qk_layernorm"):
            raise UnsupportedModel(f"{source}: phi with qk_layernorm is not supported")
        kw.update(norm="layernorm", norm_eps=get("layer_norm_eps"), mlp="plain", parallel_residual=True,
                  shared_attention_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True)
    if t == "gpt_neox":
        kw.update(norm="layernorm", norm_eps=get("layer_norm_eps"), mlp="plain",
                  parallel_residual=bool(get("use_parallel_residual")), qkv_bias=bool(get("attention_bias")),
                  attn_out_bias=bool(get("attention_bias")), mlp_bias=True)
    try:
        config = Config(**kw)
    except InputError as e:  # e.g. a field of config.json with the wrong type
        raise UnsupportedModel(f"{source}: {e}") from None
    check_layer_types(hf, config, source)
    return config


def rope_from_hf(hf: dict, family: Family) -> dict:
    # transformers 5 writes rope_parameters; hub checkpoints have rope_theta + rope_scaling (or GPT-NeoX's names)
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base")))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    out = dict(rope_base=float(base if base is not None else family.defaults.get("rope_theta")),
               rotary_fraction=float(fraction if fraction is not None else
                                     family.defaults.get("partial_rotary_factor", family.defaults.get("rotary_pct", 1.0))))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "llama3":
        out.update(rope_type="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_block_size=int(params["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported (supported: default, llama3)")
    return out


def check_layer_types(hf: dict, config: Config, source: str) -> None:
    """transformers 5 configs list each layer's attention; make sure ours uses the window on the same layers."""
    layer_types = hf.get("layer_types")
    if not layer_types or config.sliding_window is None:
        return
    ours = ["sliding_attention" if i % config.sliding_window_period == 0 else "full_attention"
            for i in range(config.n_layer)]
    if list(layer_types) != ours:
        raise UnsupportedModel(f"{source}: layer_types {layer_types} is not a pattern Config can express")


def config_to_hf(config: Config) -> dict:
    family = FAMILIES.get(config.hf_model_type)
    if family is None:
        raise UnsupportedModel(f"Config.hf_model_type {config.hf_model_type!r} has no Hugging Face mapping; "
                               f"supported: {', '.join(sorted(FAMILIES))}")
    t = config.hf_model_type
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new" if t == "phi" else "gelu_pytorch_tanh"}
    hf = dict(architectures=[family.architecture], model_type=t, vocab_size=config.vocab_size,
              hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
              num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
              num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
              max_position_embeddings=config.block_size, tie_word_embeddings=config.tie_embeddings,
              rope_theta=config.rope_base, torch_dtype="float32")
    hf["hidden_activation" if t == "gemma2" else "hidden_act"] = act[config.activation]
    if config.rope_type == "llama3":
        hf["rope_scaling"] = dict(rope_type="llama3", factor=config.rope_factor,
                                  low_freq_factor=config.rope_low_freq_factor,
                                  high_freq_factor=config.rope_high_freq_factor,
                                  original_max_position_embeddings=config.rope_original_block_size)
    if config.norm == "rmsnorm":
        hf["rms_norm_eps"] = config.norm_eps
    else:
        hf["layer_norm_eps"] = config.norm_eps
    if t in ("llama", "mistral", "mixtral", "qwen3", "phi3"):
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if t in ("mistral", "mixtral", "phi3"):
        hf["sliding_window"] = config.sliding_window
    if t in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                  max_window_layers=0)
    if t == "mixtral":
        hf.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token,
                  router_aux_loss_coef=config.router_aux_loss_coef)
    if t == "gemma2":
        hf.update(query_pre_attn_scalar=config.query_pre_attn_scalar, attn_logit_softcapping=config.attn_softcap,
                  final_logit_softcapping=config.final_softcap, sliding_window=config.sliding_window)
    if t in ("phi", "phi3"):
        hf["partial_rotary_factor"] = config.rotary_fraction
    if t == "gpt_neox":
        hf.update(rotary_pct=config.rotary_fraction, rotary_emb_base=config.rope_base,
                  use_parallel_residual=config.parallel_residual, attention_bias=config.qkv_bias)
    return hf


def hf_name(family: Family, ours: str) -> tuple[str, str | None]:
    """Our parameter name -> (HF name on disk, part of a fused HF tensor or None)."""
    for pattern, template in family.names:
        m = re.fullmatch(pattern, ours)
        if m:
            return m.expand(template), m.groupdict().get("part")
    raise UnsupportedModel(f"no Hugging Face name for parameter {ours!r} in family {family.model_type!r}")


def is_ignored(family: Family, hf_key: str) -> bool:
    return any(re.fullmatch(p, hf_key) for p in family.ignored)


def split_fused(family: Family, tensor: torch.Tensor, config: Config, parts: set[str]) -> dict[str, torch.Tensor]:
    """One fused HF tensor -> our separate tensors, keyed by part ("q", "k", "v" or "gate", "up")."""
    hd, rest = config.head_dim, tensor.shape[1:]
    if parts == {"gate", "up"}:  # Phi-3 gate_up_proj: [gate; up]
        gate, up = tensor.chunk(2)
        return {"gate": gate.clone(), "up": up.clone()}
    if family.fused == "stacked":  # [q; k; v]
        q, k, v = tensor.split([config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd])
        return {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    # per_head: GPT-NeoX interleaves [q_h; k_h; v_h] for each head h
    t = tensor.view(config.n_head, 3, hd, *rest)
    return {p: t[:, i].reshape(config.n_head * hd, *rest).clone() for i, p in enumerate("qkv")}


def join_fused(family: Family, parts: dict[str, torch.Tensor], config: Config) -> torch.Tensor:
    if set(parts) == {"gate", "up"}:
        return torch.cat([parts["gate"], parts["up"]])
    if family.fused == "stacked":
        return torch.cat([parts["q"], parts["k"], parts["v"]])
    hd, rest = config.head_dim, parts["q"].shape[1:]
    stacked = torch.stack([parts[p].view(config.n_head, hd, *rest) for p in "qkv"], dim=1)
    return stacked.reshape(config.n_head * 3 * hd, *rest)
