"""A GPT in one file: Config with presets of real model families, the modules, a KV cache.

Every family is described by fields of one flat Config, never by its name, and matches the
reference `transformers` implementation logit for logit (tests/test_model_parity.py).
"""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml


@dataclass
class Config:
    name: str = ""  # preset name: the Hugging Face repository name without the organisation
    hf_model_type: str = "llama"  # transformers `model_type` this converts to and from (convert/ only)
    block_size: int = 4096  # longest sequence the model is used with (RoPE table, KV cache)
    vocab_size: int = 32000  # rows of the embedding and of the output head
    n_layer: int = 32  # transformer blocks
    n_head: int = 32  # query heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    n_embd: int = 4096  # width of the residual stream
    head_dim: int | None = None  # width of one head; None = n_embd // n_head
    intermediate_size: int = 11008  # hidden width of the MLP (of each expert for MoE)
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x))); "moe": gated experts
    activation: str = "silu"  # "silu", "gelu" (exact erf) or "gelu_tanh" (tanh approximation)
    n_expert: int = 0  # experts per MoE layer
    n_expert_per_token: int = 0  # experts each token is routed to
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm" (with bias)
    norm_eps: float = 1e-5  # epsilon inside every norm
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight); Gemma stores weight - 1
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)) instead of two sequential residuals
    shared_attention_norm: bool = False  # parallel residual: the MLP reads the attention's norm (Phi-2)
    post_block_norms: bool = False  # extra norms on the attention and MLP outputs (Gemma 2)
    qkv_bias: bool = False  # bias on q/k/v projections
    attn_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on the MLP projections
    lm_head_bias: bool = False  # bias on the output head (Phi-2)
    tie_embeddings: bool = False  # the output head reuses the embedding matrix
    scale_embeddings: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)
    rope_base: float = 10000.0  # RoPE theta
    rotary_fraction: float = 1.0  # share of head_dim that is rotated (partial rotary: Phi-2, Pythia)
    rope_type: str = "default"  # "default" or "llama3" (Llama 3.1+ frequency scaling)
    rope_factor: float = 1.0  # llama3 scaling: factor
    rope_low_freq_factor: float = 1.0  # llama3 scaling: low_freq_factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: high_freq_factor
    rope_original_block_size: int = 8192  # llama3 scaling: original_max_position_embeddings
    query_pre_attn_scalar: float | None = None  # softmax scale is this ** -0.5; None = head_dim (Gemma 2 sets it)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # same on the output logits (Gemma 2)
    sliding_window: int | None = None  # a query sees keys at most this many positions back (itself included)
    sliding_window_period: int = 1  # layer i uses the window when i % period == 0 (Gemma 2: every other layer)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    @property
    def rope_n_elem(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in name_to_config:
            close = [n for n in name_to_config if name.lower() in n.lower()]
            hint = f" Did you mean one of {close}?" if close else " See model.name_to_config for the list."
            raise ValueError(f"unknown model preset {name!r}.{hint}")
        return cls(**{**name_to_config[name], **overrides})

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "Config":
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown Config field(s) {unknown}")
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.n_embd)
        # A tied head has no weight of its own: the embedding matrix is used directly, so there is
        # one tensor in the state dict and safetensors never sees shared storage.
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        # RoPE tables are derived, not learned: non-persistent, rebuilt if the model was made on meta.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size).

        Without input_pos: a full causal forward over positions 0..T-1.
        With input_pos (T,): the absolute positions of these tokens; keys and values go to the KV cache
        (see set_kv_cache), so prefill is input_pos = arange(T) and each decode step one position.
        """
        B, T = idx.shape
        if self.rope_cos.numel() == 0 or self.rope_cos.is_meta or self.rope_cos.device != idx.device:
            self.init_rope_cache(idx.device)
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            q_pos = torch.arange(T, device=idx.device)
            k_pos = q_pos
        else:
            if self.layers[0].attn.kv_cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(batch_size) first")
            q_pos = input_pos
            k_pos = torch.arange(self.layers[0].attn.kv_cache.k.shape[2], device=idx.device)
        cos, sin = self.rope_cos[q_pos], self.rope_sin[q_pos]  # (T, rope_n_elem)
        masks = attention_masks(self.config, q_pos, k_pos, cached=input_pos is not None)

        x = self.embed(idx)  # (B, T, n_embd)
        if self.config.scale_embeddings:
            # Gemma rounds the scale to the activation dtype before multiplying; so do we.
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, masks[block.attn.sliding_window is not None], input_pos)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if self.config.final_softcap is not None:
            logits = softcap(logits, self.config.final_softcap)
        return logits

    def init_rope_cache(self, device: torch.device | None = None) -> None:
        cos, sin = build_rope_cache(self.config, self.config.block_size, device)
        self.rope_cos, self.rope_sin = cos, sin

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> None:
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds block_size {self.config.block_size}")
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_kv_head, max_seq_length, self.config.head_dim,
                                          device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (GPT-2 / nanoGPT): every Linear and the embedding
        ~ N(0, 0.02), biases 0, and the projections that write into the residual stream (o_proj, down_proj)
        scaled by 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth. Norm scales
        start at identity (1, or 0 when the norm adds an offset of 1)."""
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.config.n_layer) if residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 1.0 - module.offset)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = None if config.shared_attention_norm else make_norm(config, config.n_embd)
        self.mlp = MoE(config) if config.mlp == "moe" else MLP(config)
        self.post_attn_norm = make_norm(config, config.n_embd) if config.post_block_norms else None
        self.post_mlp_norm = make_norm(config, config.n_embd) if config.post_block_norms else None

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.attn_norm(x)
        a = self.attn(h, cos, sin, mask, input_pos)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        if self.config.parallel_residual:
            m = self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))
            return x + a + m
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.config = config
        C, hd = config.n_embd, config.head_dim
        self.q_proj = nn.Linear(C, config.n_head * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, config.n_kv_head * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, config.n_kv_head * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hd, C, bias=config.attn_out_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, hd)
            self.k_norm = make_norm(config, hd)
        use_window = config.sliding_window is not None and layer_idx % config.sliding_window_period == 0
        self.sliding_window = config.sliding_window if use_window else None
        self.scale = (config.query_pre_attn_scalar or hd) ** -0.5
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, C = x.shape
        hd = self.config.head_dim
        q = self.q_proj(x).view(B, T, self.config.n_head, hd)
        k = self.k_proj(x).view(B, T, self.config.n_kv_head, hd)
        v = self.v_proj(x).view(B, T, self.config.n_kv_head, hd)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head or n_kv_head, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)  # (B, n_kv_head, max_seq_length, head_dim)

        if self.config.attn_softcap is None:
            # mask None means plain causal over equal-length q and k: SDPA's fastest path
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.config.n_kv_head != self.config.n_head)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, self.config.attn_softcap)
        y = y.transpose(1, 2).reshape(B, T, self.config.n_head * hd)
        return self.o_proj(y)


def softcapped_attention(q, k, v, mask, scale, cap):
    """Eager attention with tanh-capped scores (SDPA has no softcap). Query heads are grouped onto their
    key/value head with a view, so GQA costs no copies of k and v."""
    B, n_head, T, hd = q.shape
    n_kv_head, S = k.shape[1], k.shape[2]
    q = q.view(B, n_kv_head, n_head // n_kv_head, T, hd)
    scores = softcap(q @ k.unsqueeze(2).transpose(-1, -2) * scale, cap)  # (B, n_kv_head, group, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v.unsqueeze(2)).view(B, n_head, T, hd)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def attention_masks(config: Config, q_pos: torch.Tensor, k_pos: torch.Tensor, cached: bool):
    """Boolean (T, S) masks, True = may attend, for full and sliding-window layers: (full, sliding).
    None stands for the plain causal mask, which SDPA builds itself."""
    delta = q_pos[:, None] - k_pos[None, :]  # how far back each key is from each query
    full = delta >= 0 if cached else None
    sliding = None
    if config.sliding_window is not None:
        sliding = (delta >= 0) & (delta < config.sliding_window)
    return full, sliding


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_head, max_seq_length, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos, k, v):
        # Slot = absolute position, so the causal mask over slots also hides slots not yet written.
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        C, H = config.n_embd, config.intermediate_size
        if config.mlp in ("gated", "moe"):
            self.gate_proj = nn.Linear(C, H, bias=config.mlp_bias)
        elif config.mlp != "plain":
            raise ValueError(f"Config.mlp must be 'gated', 'plain' or 'moe', got {config.mlp!r}")
        self.up_proj = nn.Linear(C, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=config.mlp_bias)

    def forward(self, x):
        if self.config.mlp == "plain":
            return self.down_proj(activation(self.config.activation, self.up_proj(x)))
        return self.down_proj(activation(self.config.activation, self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sparse mixture of gated MLP experts with top-k routing (Mixtral)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        # Mixtral: softmax over all experts in fp32, keep the top k, renormalise them to sum to 1.
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.config.n_expert_per_token, dim=-1)  # (B*T, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return y.view(B, T, C)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma scales in fp32, then casts
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        # Llama casts back to the activation dtype, then scales: the order matters in bf16
        return self.weight * normed.to(x.dtype)


def make_norm(config: Config, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.norm_offset)
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    raise ValueError(f"Config.norm must be 'rmsnorm' or 'layernorm', got {config.norm!r}")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"Config.activation must be 'silu', 'gelu' or 'gelu_tanh', got {name!r}")


def build_rope_cache(config: Config, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (seq_len, rope_n_elem), in fp32. Frequencies as transformers computes them,
    with the two halves of a head rotated together (rotate_half), the layout of HF checkpoints."""
    dim = config.rope_n_elem
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = config.rope_original_block_size / config.rope_low_freq_factor
        high_wavelen = config.rope_original_block_size / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
        smooth = (config.rope_original_block_size / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif config.rope_type != "default":
        raise ValueError(f"Config.rope_type must be 'default' or 'llama3', got {config.rope_type!r}")
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_n_elem channels of x (B, n_head, T, head_dim); the rest pass through."""
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :rd], x[..., rd:]
    half1, half2 = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = rot * cos + torch.cat((-half2, half1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


# Presets: real shapes of the released checkpoints (their config.json), as plain data.
llama2 = dict(hf_model_type="llama", block_size=4096, vocab_size=32000, norm_eps=1e-5)
llama3 = dict(hf_model_type="llama", block_size=8192, vocab_size=128256, n_kv_head=8, rope_base=500000.0)
llama31 = dict(llama3, block_size=131072, rope_type="llama3", rope_factor=8.0)
qwen25 = dict(hf_model_type="qwen2", vocab_size=152064, qkv_bias=True, norm_eps=1e-6, rope_base=1000000.0,
              block_size=131072)
qwen3 = dict(hf_model_type="qwen3", vocab_size=151936, qk_norm=True, head_dim=128, norm_eps=1e-6,
             rope_base=1000000.0, block_size=40960)
gemma2 = dict(hf_model_type="gemma2", vocab_size=256000, block_size=8192, mlp="gated", activation="gelu_tanh",
              norm_eps=1e-6, norm_offset=1.0, post_block_norms=True, tie_embeddings=True, scale_embeddings=True,
              attn_softcap=50.0, final_softcap=30.0, sliding_window=4096, sliding_window_period=2)
pythia = dict(hf_model_type="gpt_neox", vocab_size=50304, block_size=2048, mlp="plain", activation="gelu",
              norm="layernorm", parallel_residual=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
              rotary_fraction=0.25)
smollm2 = dict(hf_model_type="llama", vocab_size=49152, block_size=8192, tie_embeddings=True, rope_base=100000.0)

configs = [
    # Llama 2
    dict(llama2, name="Llama-2-7b-hf", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    dict(llama2, name="Llama-2-7b-chat-hf", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    dict(llama2, name="Llama-2-13b-hf", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    dict(llama2, name="Llama-2-13b-chat-hf", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    dict(llama2, name="Llama-2-70b-hf", n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672),
    dict(llama2, name="Llama-2-70b-chat-hf", n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
         intermediate_size=28672),
    # Llama 3, 3.1, 3.2
    dict(llama3, name="Meta-Llama-3-8B", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
    dict(llama3, name="Meta-Llama-3-8B-Instruct", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
    dict(llama3, name="Meta-Llama-3-70B", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672),
    dict(llama3, name="Meta-Llama-3-70B-Instruct", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672),
    dict(llama31, name="Llama-3.1-8B", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
    dict(llama31, name="Llama-3.1-8B-Instruct", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
    dict(llama31, name="Llama-3.1-70B", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672),
    dict(llama31, name="Llama-3.1-70B-Instruct", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672),
    dict(llama31, name="Llama-3.1-405B", n_layer=126, n_head=128, n_embd=16384, intermediate_size=53248),
    dict(llama31, name="Llama-3.2-1B", n_layer=16, n_head=32, n_embd=2048, head_dim=64, intermediate_size=8192,
         tie_embeddings=True, rope_factor=32.0),
    dict(llama31, name="Llama-3.2-1B-Instruct", n_layer=16, n_head=32, n_embd=2048, head_dim=64,
         intermediate_size=8192, tie_embeddings=True, rope_factor=32.0),
    dict(llama31, name="Llama-3.2-3B", n_layer=28, n_head=24, n_embd=3072, head_dim=128, intermediate_size=8192,
         tie_embeddings=True, rope_factor=32.0),
    dict(llama31, name="Llama-3.2-3B-Instruct", n_layer=28, n_head=24, n_embd=3072, head_dim=128,
         intermediate_size=8192, tie_embeddings=True, rope_factor=32.0),
    # TinyLlama
    dict(llama2, name="TinyLlama-1.1B-intermediate-step-1431k-3T", block_size=2048, n_layer=22, n_head=32,
         n_kv_head=4, n_embd=2048, intermediate_size=5632),
    dict(llama2, name="TinyLlama-1.1B-Chat-v1.0", block_size=2048, n_layer=22, n_head=32, n_kv_head=4,
         n_embd=2048, intermediate_size=5632),
    # Mistral, Mixtral
    dict(name="Mistral-7B-v0.1", hf_model_type="mistral", block_size=32768, vocab_size=32000, n_layer=32,
         n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, sliding_window=4096),
    dict(name="Mixtral-8x7B-v0.1", hf_model_type="mixtral", block_size=32768, vocab_size=32000, n_layer=32,
         n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, mlp="moe", n_expert=8,
         n_expert_per_token=2, rope_base=1000000.0),
    # Qwen2.5 (the three smallest tie their embeddings and have a smaller padded vocabulary)
    dict(qwen25, name="Qwen2.5-0.5B", vocab_size=151936, block_size=32768, n_layer=24, n_head=14, n_kv_head=2,
         n_embd=896, intermediate_size=4864, tie_embeddings=True),
    dict(qwen25, name="Qwen2.5-1.5B", vocab_size=151936, block_size=32768, n_layer=28, n_head=12, n_kv_head=2,
         n_embd=1536, intermediate_size=8960, tie_embeddings=True),
    dict(qwen25, name="Qwen2.5-3B", vocab_size=151936, block_size=32768, n_layer=36, n_head=16, n_kv_head=2,
         n_embd=2048, intermediate_size=11008, tie_embeddings=True),
    dict(qwen25, name="Qwen2.5-7B", n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, intermediate_size=18944),
    dict(qwen25, name="Qwen2.5-14B", n_layer=48, n_head=40, n_kv_head=8, n_embd=5120, intermediate_size=13824),
    dict(qwen25, name="Qwen2.5-32B", n_layer=64, n_head=40, n_kv_head=8, n_embd=5120, intermediate_size=27648),
    dict(qwen25, name="Qwen2.5-72B", n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=29568),
    # Qwen3 dense
    dict(qwen3, name="Qwen3-0.6B", n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, intermediate_size=3072,
         tie_embeddings=True),
    dict(qwen3, name="Qwen3-1.7B", n_layer=28, n_head=16, n_kv_head=8, n_embd=2048, intermediate_size=6144,
         tie_embeddings=True),
    dict(qwen3, name="Qwen3-4B", n_layer=36, n_head=32, n_kv_head=8, n_embd=2560, intermediate_size=9728,
         tie_embeddings=True),
    dict(qwen3, name="Qwen3-8B", n_layer=36, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=12288),
    dict(qwen3, name="Qwen3-14B", n_layer=40, n_head=40, n_kv_head=8, n_embd=5120, intermediate_size=17408),
    dict(qwen3, name="Qwen3-32B", n_layer=64, n_head=64, n_kv_head=8, n_embd=5120, intermediate_size=25600),
    # Gemma 2
    dict(gemma2, name="gemma-2-2b", n_layer=26, n_head=8, n_kv_head=4, n_embd=2304, head_dim=256,
         intermediate_size=9216, query_pre_attn_scalar=256),
    dict(gemma2, name="gemma-2-2b-it", n_layer=26, n_head=8, n_kv_head=4, n_embd=2304, head_dim=256,
         intermediate_size=9216, query_pre_attn_scalar=256),
    dict(gemma2, name="gemma-2-9b", n_layer=42, n_head=16, n_kv_head=8, n_embd=3584, head_dim=256,
         intermediate_size=14336, query_pre_attn_scalar=256),
    dict(gemma2, name="gemma-2-27b", n_layer=46, n_head=32, n_kv_head=16, n_embd=4608, head_dim=128,
         intermediate_size=36864, query_pre_attn_scalar=144),
    # Phi
    dict(name="phi-2", hf_model_type="phi", block_size=2048, vocab_size=51200, n_layer=32, n_head=32, n_embd=2560,
         intermediate_size=10240, mlp="plain", activation="gelu_tanh", norm="layernorm", parallel_residual=True,
         shared_attention_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True,
         rotary_fraction=0.4),
    dict(name="Phi-3-mini-4k-instruct", hf_model_type="phi3", block_size=4096, vocab_size=32064, n_layer=32,
         n_head=32, n_embd=3072, intermediate_size=8192, sliding_window=2047),
    # Pythia (GPT-NeoX)
    dict(pythia, name="pythia-14m", n_layer=6, n_head=4, n_embd=128, intermediate_size=512),
    dict(pythia, name="pythia-31m", n_layer=6, n_head=8, n_embd=256, intermediate_size=1024),
    dict(pythia, name="pythia-70m", n_layer=6, n_head=8, n_embd=512, intermediate_size=2048),
    dict(pythia, name="pythia-160m", n_layer=12, n_head=12, n_embd=768, intermediate_size=3072),
    dict(pythia, name="pythia-410m", n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096),
    dict(pythia, name="pythia-1b", n_layer=16, n_head=8, n_embd=2048, intermediate_size=8192),
    dict(pythia, name="pythia-1.4b", n_layer=24, n_head=16, n_embd=2048, intermediate_size=8192),
    dict(pythia, name="pythia-2.8b", n_layer=32, n_head=32, n_embd=2560, intermediate_size=10240),
    dict(pythia, name="pythia-6.9b", vocab_size=50432, n_layer=32, n_head=32, n_embd=4096, intermediate_size=16384),
    dict(pythia, name="pythia-12b", vocab_size=50688, n_layer=36, n_head=40, n_embd=5120, intermediate_size=20480),
    # SmolLM2
    dict(smollm2, name="SmolLM2-135M", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536),
    dict(smollm2, name="SmolLM2-135M-Instruct", n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
         intermediate_size=1536),
    dict(smollm2, name="SmolLM2-360M", n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560),
    dict(smollm2, name="SmolLM2-360M-Instruct", n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
         intermediate_size=2560),
    dict(smollm2, name="SmolLM2-1.7B", n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192,
         rope_base=130000.0),
    dict(smollm2, name="SmolLM2-1.7B-Instruct", n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192,
         rope_base=130000.0),
    # Our own: a model for fast tests, and the built-in CPU default (trained on the Python standard library)
    dict(name="tiny-test", block_size=128, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
         intermediate_size=128),
    dict(name="stdlib-llama-6m", block_size=256, vocab_size=8192, n_layer=6, n_head=4, n_kv_head=2, n_embd=256,
         intermediate_size=704, tie_embeddings=True),
]
name_to_config = {c["name"]: c for c in configs}
