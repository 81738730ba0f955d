"""A GPT in one file: Config with presets of real model families, the modules, a KV cache.

Every family is described by fields of one flat Config, never by its name, and matches the
reference `transformers` implementation logit for logit (tests/test_convert.py).
"""

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import UnionType

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import yaml
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


class InputError(ValueError):
    """Bad input a user can fix (a flag, a file, a Config or LoRAConfig value): every script prints it as one line,
    'error: ...', and exits 1. A ValueError, as jsonargparse expects of a dataclass argument that rejects a value."""


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
    router_aux_loss_coef: float = 0.001  # MoE training: weight of the load-balancing loss (transformers' default)
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
        # A preset, a model_config.yaml or --model.overrides with a wrong type or size fails here, naming the field,
        # instead of deep inside GPT(config) (YAML reads `n_layer: 4x` as a string; a float where an int goes).
        for f in fields(self):
            value, optional = getattr(self, f.name), isinstance(f.type, UnionType)  # `int | None`
            kind = f.type.__args__[0] if optional else f.type
            if value is None and optional:
                continue
            kinds = (float, int) if kind is float else kind  # an int is a fine float; a bool is no int here
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds):
                raise InputError(f"{f.name} {value!r}: expected {kind.__name__}{' or null' if optional else ''}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} {getattr(self, name)}: expected a positive integer")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise InputError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    @property
    def rope_n_elem(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in name_to_config:
            close = [n for n in name_to_config if name.lower() in n.lower()]
            hint = f" Did you mean one of {close}?" if close else " See model.name_to_config for the list."
            raise InputError(f"unknown model preset {name!r}.{hint}")
        if unknown := sorted(set(overrides) - {f.name for f in fields(cls)}):
            raise InputError(f"unknown Config field(s) {unknown}")
        return cls(**{**name_to_config[name], **overrides})

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "Config":
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{path}: unknown Config field(s) {unknown}")
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
        # How a packed batch (doc_ids) attends: "flex" (FlexAttention with a block-sparse mask, compiled: the fast
        # path on CUDA), "varlen" (each document on its own, as flash-attention's varlen kernels do: the fast path on
        # a CPU, a Python loop over documents), "sdpa" (one dense block-diagonal mask: the reference, any device),
        # "auto": flex on CUDA, varlen elsewhere.
        self.document_attention = "auto"
        self.init_weights()

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, per_token: bool = False,
                doc_ids: torch.Tensor | None = None, temperature: float = 1.0,
                entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) token ids -> logits (B, T, vocab_size): the trunk, then the head.

        Without input_pos: a full causal forward over positions 0..T-1.
        With input_pos (T,), increasing: the cache slots of these tokens; keys and values go to the KV cache
        (see set_kv_cache), so prefill is input_pos = arange(T) and each decode step one slot. input_pos (B, T):
        row b's own slots (= positions), so that rows of different lengths decode together (serve.py).
        pad (B,): how many left-padding tokens each row starts with, for batches of prompts of different
        lengths. Row b's real tokens then take RoPE positions from 0 and never see its padding, so each row
        computes what it would alone.
        last_only: logits of the last position only, (B, 1, vocab_size): a prefill needs no more, and the head
        over every prompt position would cost as much as the rest of a small model's prefill.
        targets (B, T): instead of logits, return the sum of the cross entropies of the targets (fp32 scalar;
        positions whose target is -100 left out), computed a chunk of positions at a time without ever holding
        the (B, T, vocab_size) logits (see linear_cross_entropy). Callers divide by their own token count.
        per_token (with targets): return each target's log-probability instead, (B, T) in fp32, 0 where the target
        is -100, also a chunk at a time (token_logprobs). Here in forward, not beside it, so that under FSDP the
        head's weight is gathered and under DDP it is seen used. temperature: of softmax(logits / temperature), the
        distribution a sampler at that temperature draws from (RL scores its own samples so). entropy: also return
        each position's entropy of that distribution, (B, T) fp32 without a gradient (a metric), as a second tensor.
        doc_ids (B, T): a packed batch, several documents per row, numbered so that a new number starts a new
        document (padding as one more). Each token attends only to earlier tokens of its own document, and
        positions restart at 0 with each document, so every document computes exactly what it computes alone.
        """
        x = self.trunk(idx, input_pos, pad, last_only, doc_ids)
        if targets is not None and per_token:
            return self.token_logprobs(x, targets, temperature=temperature, entropy=entropy)
        if targets is not None and (self.lm_head is None or type(self.lm_head) is nn.Linear):
            weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
            bias = None if self.lm_head is None else self.lm_head.bias
            return linear_cross_entropy(x.flatten(0, -2), weight, bias, targets.flatten(), self.config.final_softcap)
        logits = self.head(x)
        if targets is not None:  # a LoRA or quantised head: its own forward, then the plain loss
            logits = logits.flatten(0, -2).to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return logits

    def trunk(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, pad: torch.Tensor | None = None,
              last_only: bool = False, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, n_embd), what the head reads (arguments as in forward)."""
        B, T = idx.shape
        if self.rope_cos.numel() == 0 or self.rope_cos.is_meta or self.rope_cos.device != idx.device:
            self.init_rope_cache(idx.device)
        if input_pos is None:
            if T > self.config.block_size and doc_ids is None:  # (a packed row may be longer: its documents may not)
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            q_pos = torch.arange(T, device=idx.device)
            k_pos = q_pos
        else:
            if self.layers[0].attn.kv_cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(batch_size) first")
            q_pos = input_pos
            # Slots past the newest position are empty: leave them out of attention altogether.
            k_pos = torch.arange(int(input_pos[..., -1].max()) + 1, device=idx.device)
        if doc_ids is not None:
            if input_pos is not None or pad is not None:
                raise ValueError("doc_ids (a packed training batch) goes without input_pos and pad (generation)")
            positions = document_positions(doc_ids)  # (B, T)
            # a document longer than block_size needs a row longer than it: only then look (the max is a device sync)
            if T > self.config.block_size and int(positions.max()) >= self.config.block_size:
                raise ValueError(f"a document of {int(positions.max()) + 1} tokens exceeds block_size "
                                 f"{self.config.block_size}")
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, r)
            backend = self.document_attention
            if backend == "auto":
                backend = "flex" if idx.is_cuda else "varlen"
            masks = document_masks(self.config, doc_ids, backend)
        elif input_pos is not None and input_pos.dim() == 2:
            # (B, T): each row at its own positions, as a server's slots are (continuous batching, serve.py). A row
            # sees its own slots up to each query's position only: the slots beyond are a longer neighbour's
            # positions, or still hold the keys of the request that had the row before.
            if pad is not None:
                raise ValueError("input_pos (B, T) gives each row its own positions: it goes without pad")
            delta = (input_pos[:, :, None] - k_pos)[:, None]  # (B, 1, T, S): how far back each key is from each query
            window = self.config.sliding_window
            masks = (delta >= 0, None if window is None else (delta >= 0) & (delta < window))
            cos, sin = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)  # (B, 1, T, r)
        elif pad is None:
            masks = attention_masks(self.config, q_pos, k_pos, explicit=False)
            cos, sin = self.rope_cos[q_pos], self.rope_sin[q_pos]  # (T, rope_n_elem)
        else:
            masks = attention_masks(self.config, q_pos, k_pos, explicit=True)
            positions = (q_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, r)
            # A padding slot is hidden from every query but itself: a query row with no key at all would
            # give NaN, and NaN values in the cache poison real rows even under a zero attention weight.
            visible = (k_pos[None, :] >= pad[:, None])[:, None, None, :] | (q_pos[:, None] == k_pos[None, :])
            masks = tuple(m if m is None else m & visible for m in masks)  # (B, 1, T, S)

        x = self.embed(idx)  # (B, T, n_embd)
        # the tables in the dtype q and k will have, once per forward rather than in every layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
        if self.config.scale_embeddings:
            # Gemma rounds the scale to the activation dtype before multiplying; so do we.
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, masks[block.attn.sliding_window is not None], input_pos, len(k_pos))
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_embd) -> logits (..., vocab_size): the output head (tied or not), then Gemma 2's softcap."""
        logits = linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if self.config.final_softcap is not None:
            logits = softcap(logits, self.config.final_softcap)
        return logits

    def token_logprobs(self, x: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256, temperature: float = 1.0,
                       entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log p(targets) under the head, (B, T) float32 from the trunk's output x (B, T, n_embd); 0 where the target
        is IGNORE_INDEX. chunk_rows positions at a time, each chunk's logits recomputed in the backward pass
        (activation checkpointing), so neither pass holds more than one chunk's (chunk_rows, vocab_size) logits:
        what preference losses and scoring need, with the gradient, without (B, T, vocab) in memory. The logits are
        divided by temperature first; entropy: also each position's entropy (no gradient), 0 where ignored."""
        flat_x, flat_t = x.flatten(0, -2), targets.flatten()
        kept = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
        out = torch.zeros(flat_t.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        entropies = torch.zeros_like(out) if entropy else None
        track = torch.is_grad_enabled()
        for start in range(0, len(kept), chunk_rows):
            rows = kept[start:start + chunk_rows]
            if track:
                lp, ent = torch.utils.checkpoint.checkpoint(self._chunk_logprobs, flat_x[rows], flat_t[rows],
                                                            temperature, entropy, use_reentrant=False)
            else:
                lp, ent = self._chunk_logprobs(flat_x[rows], flat_t[rows], temperature, entropy)
            out = out.index_put((rows,), lp)  # out of place: autograd routes each chunk's gradient back
            if entropy:
                entropies[rows] = ent
        out = out.view(targets.shape)
        return (out, entropies.view(targets.shape)) if entropy else out

    def _chunk_logprobs(self, x: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                        entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(x)
        if temperature != 1.0:
            logits = logits / temperature
        # the softmax in float32 at least, as the fused loss does
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        ent = -(logp.exp() * logp).sum(-1).detach() if entropy else None
        return logp.gather(1, targets[:, None]).squeeze(1), ent

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

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        h = self.attn_norm(x)
        a = self.attn(h, cos, sin, mask, input_pos, kv_len)
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
        # q, k and v stacked into one matrix by generation.fuse_projections; None: three matmuls
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        B, T, C = x.shape
        hd, n_head, n_kv_head = self.config.head_dim, self.config.n_head, self.config.n_kv_head
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = linear(x, self.qkv_weight, self.qkv_bias).split(
                (n_head * hd, n_kv_head * hd, n_kv_head * hd), dim=-1)
        q, k, v = q.view(B, T, n_head, hd), k.view(B, T, n_kv_head, hd), v.view(B, T, n_kv_head, hd)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head or n_kv_head, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)  # (B, n_kv_head, max_seq_length, head_dim)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # the filled slots; empty ones would only be masked out

        if isinstance(mask, BlockMask):  # a packed batch on the FlexAttention path (document_masks)
            y = flex_attention_fn(q.is_cuda)(q, k, v, score_mod=softcap_score(self.config.attn_softcap),
                                             block_mask=mask, scale=self.scale,
                                             enable_gqa=self.config.n_kv_head != self.config.n_head)
        elif isinstance(mask, list):  # a packed batch, a document at a time: (row, start, end, its own mask)
            y = torch.cat([torch.cat([self.attend(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], m)
                                      for row, s, e, m in mask if row == b], dim=2) for b in range(B)])
        else:
            y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.config.n_head * hd)
        return self.o_proj(y)

    def attend(self, q, k, v, mask):
        if self.config.attn_softcap is not None:
            return softcapped_attention(q, k, v, mask, self.scale, self.config.attn_softcap)
        # mask None means plain causal over equal-length q and k: SDPA's fastest path
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              scale=self.scale, enable_gqa=self.config.n_kv_head != self.config.n_head)


def softcapped_attention(q, k, v, mask, scale, cap):
    """Eager attention with tanh-capped scores (SDPA has no softcap). Query heads are grouped onto their
    key/value head with a view, so GQA costs no copies of k and v."""
    B, n_head, T, hd = q.shape
    n_kv_head, S = k.shape[1], k.shape[2]
    q = q.view(B, n_kv_head, n_head // n_kv_head, T, hd)
    scores = softcap(q @ k.unsqueeze(2).transpose(-1, -2) * scale, cap)  # (B, n_kv_head, group, T, S)
    if mask is None:  # causal; a single query (a decode step) sees every key
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    elif mask.dim() == 4:  # per-row mask (B, 1, T, S): broadcast over the query-head group too
        mask = mask.unsqueeze(2)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v.unsqueeze(2)).view(B, n_head, T, hd)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


IGNORE_INDEX = -100  # a target that adds nothing to the loss (prompt tokens, padding), as in PyTorch and HF


@torch.compiler.disable  # a Python loop over chunks with in-place updates: nothing for the compiler to gain
def attention_masks(config: Config, q_pos: torch.Tensor, k_pos: torch.Tensor, explicit: bool):
    """Boolean (T, S) masks, True = may attend, for full and sliding-window layers: (full, sliding).
    None stands for "every key up to the query's own position", which needs no mask tensor: SDPA's is_causal
    when T == S (a full forward, or a prefill from slot 0), nothing at all when T == 1 (a decode step, whose
    keys are exactly the filled slots). explicit: always build them (per-row padding is added to them)."""
    T, S = len(q_pos), len(k_pos)
    delta = q_pos[:, None] - k_pos[None, :]  # how far back each key is from each query
    implicit = not explicit and (T == S or T == 1)
    full = None if implicit else delta >= 0
    sliding = None
    if config.sliding_window is not None and not (implicit and S <= config.sliding_window):
        sliding = (delta >= 0) & (delta < config.sliding_window)
    return full, sliding


# Packed batches: the one place that says which tokens of a row attend to which. All three paths compute one mask:
# causal, within a document, and within the window on sliding layers.

def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> each token's position in its own document, from 0: the RoPE positions of a packed row."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values  # minus where the token's document began


@torch.compiler.disable  # made once per forward, outside any compiled region
def document_masks(config: Config, doc_ids: torch.Tensor, backend: str):
    """(full, sliding) masks of a packed batch, as attention_masks gives them for one sequence, for the backend:
    "sdpa": dense booleans (B, 1, T, T) (True = may attend); "flex": FlexAttention BlockMasks, whose blocks that are
    masked out entirely (other documents, the far past) are skipped rather than computed and thrown away; "varlen":
    lists of (row, start, end, mask) spans, one per document, with the mask attention_masks gives a sequence of
    that length (None: causal)."""
    B, T = doc_ids.shape
    window = config.sliding_window
    if backend == "varlen":
        spans = ([], [])
        for b in range(B):
            lengths = torch.unique_consecutive(doc_ids[b], return_counts=True)[1].tolist()
            start = 0
            for n in lengths:
                n_pos = torch.arange(n, device=doc_ids.device)
                for spans_of_kind, mask in zip(spans, attention_masks(config, n_pos, n_pos, explicit=False)):
                    spans_of_kind.append((b, start, start + n, mask))
                start += n
        return spans
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"document_attention {backend!r}: expected auto, flex, varlen or sdpa")

    def full(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)

    def sliding(b, h, q, k):
        return full(b, h, q, k) & (q - k < window)

    mask_mods = (full, sliding if window is not None else None)
    if backend == "flex":
        return tuple(m and create_block_mask(m, B, None, T, T, device=doc_ids.device) for m in mask_mods)
    b, q, k = torch.arange(B)[:, None, None], torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    b, q, k = b.to(doc_ids.device), q.to(doc_ids.device), k.to(doc_ids.device)
    return tuple(m and m(b, None, q, k)[:, None] for m in mask_mods)


def softcap_score(cap: float | None):
    """Gemma 2's attention softcap as a FlexAttention score_mod (None: no softcap)."""
    if cap is None:
        return None

    def score_mod(score, b, h, q, k):
        return torch.tanh(score / cap) * cap
    return score_mod


_compiled_flex_attention = None


def flex_attention_fn(cuda: bool):
    """FlexAttention is fast only compiled (one kernel, the masked blocks skipped); eager, as on the CPU in tests, it
    computes the full score matrix: correct, and the reference the compiled kernel is compared with."""
    global _compiled_flex_attention
    if not cuda:
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_head, max_seq_length, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos, k, v):
        if input_pos.dim() == 2:  # (B, T): each row writes its own slots (continuous batching)
            index = input_pos[:, None, :, None].expand_as(k)  # (B, n_kv_head, T, head_dim)
            return self.k.scatter_(2, index, k.to(self.k.dtype)), self.v.scatter_(2, index, v.to(self.v.dtype))
        # Slot = absolute position, so the causal mask over slots also hides slots not yet written.
        # (index_copy_ rather than self.k[:, :, input_pos] = k: half the time of index_put on CPU)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
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
        # gate and up stacked into one matrix by generation.fuse_projections; None: two matmuls
        self.register_buffer("gate_up_weight", None, persistent=False)
        self.register_buffer("gate_up_bias", None, persistent=False)

    def forward(self, x):
        if self.config.mlp == "plain":
            return self.down_proj(activation(self.config.activation, self.up_proj(x)))
        if self.gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return self.down_proj(activation(self.config.activation, gate) * up)


class MoE(nn.Module):
    """Sparse mixture of gated MLP experts with top-k routing (Mixtral)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.routing: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the last training forward's, see forward

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        # Mixtral: softmax over all experts in fp32, keep the top k, renormalise them to sum to 1.
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.config.n_expert_per_token, dim=-1)  # (B*T, k)
        if self.training:
            # What the load-balancing loss needs of this layer (router_aux_loss): per expert, the tokens routed to it
            # (top-k slots counted) and the router probability it got, summed over the tokens; and the token count
            counts = torch.zeros(self.config.n_expert, device=x.device).index_add_(
                0, chosen.flatten(), torch.ones(chosen.numel(), device=x.device))
            self.routing = (counts, probs.sum(0), B * T)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return y.view(B, T, C)


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss of the last training forward's MoE layers (Switch Transformer eq. 4-6, arXiv:2101.03961;
    Mixtral's form): n_expert * sum_e f_e * P_e, with f_e the share of top-k slots routed to expert e and P_e its mean
    router probability, both pooled over every MoE layer's tokens, as transformers' load_balancing_loss_func computes
    them (tests/test_model.py). 1 * k when balanced; it grows as routing collapses onto few experts. Only P carries a
    gradient. None when the model has no MoE layer. Training scripts add router_aux_loss_coef times it to the loss."""
    stats = [m.routing for m in model.modules() if isinstance(m, MoE) and m.routing is not None]
    if not stats:
        return None
    counts = sum(c for c, _, _ in stats)
    prob_sums = sum(p for _, p, _ in stats)
    rows = sum(n for _, _, n in stats)
    return len(counts) * torch.sum((counts / rows) * (prob_sums / rows))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and not self.offset:
            # x * rsqrt(mean(x^2) + eps) * weight in one op (a decode step calls two per layer)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # in float32, as transformers does, and in one op: bitwise x * rsqrt(mean(x^2) + eps) on the CPU
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
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


# ---------------------------------------------------------------------------------------------------------------------
# Speed: the two kernels the modules above call instead of a plain PyTorch op, each the same numbers by another route
# (tests/test_model.py). linear_cross_entropy: GPT.forward's loss without the (B, T, vocab) logits. linear: F.linear,
# with the matrix-vector products of a decode step split across the CPU's threads. Measurements: bench/RESULTS.md.


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         final_softcap: float | None = None, chunk_rows: int = 256,
                         buffer_bytes: int = 1 << 27) -> torch.Tensor:
    """Sum over rows of cross_entropy(x @ weight.T + bias, targets), targets == IGNORE_INDEX left out, with the
    gradients of x, weight and bias computed in the same pass, chunk_rows rows at a time.

    Why: for a small model with a large vocabulary the head and its softmax are most of a training step, and
    autograd's version keeps the (N, V) logits, their log-softmax and its gradient, each a trip through memory
    (a 1,024 x 50,304 step makes three 206 MB arrays). Here each chunk's logits become their own gradient in place
    (softmax minus one-hot), multiplied into the x gradient while still in cache. The weight gradient is one product
    per group of chunks, from a buffer of their logit gradients (at most buffer_bytes, 128 MB: 2,048 rows of a
    32,000-entry vocabulary in bf16): a product per chunk would add a (V, C) array into the float32 sum each time,
    a pass through memory that cost more than the product itself under bf16 autocast on a CPU. The matmuls run in
    the autocast dtype when autocast is on, the softmax always in float32."""
    need_x = torch.is_grad_enabled() and x.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    need_b = bias is not None and torch.is_grad_enabled() and bias.requires_grad
    return _LinearCrossEntropy.apply(x, weight, bias, targets, final_softcap, chunk_rows, buffer_bytes, need_x, need_w,
                                     need_b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, cap, chunk_rows, buffer_bytes, need_x, need_w, need_b):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # the softmax, the sums and the weight gradient (when summed over several groups) in float32 at least
        acc = torch.promote_types(dtype, torch.float32)
        V = weight.shape[0]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            # Rows whose target is ignored (prompt tokens, padding) add nothing to the loss or to any gradient, so
            # they skip the head altogether: in instruction tuning that is a third to a half of the positions.
            kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync per call
            every_row = len(kept) == len(targets)
            grad_x = (torch.empty_like(x) if every_row else torch.zeros_like(x)) if need_x else None
            grad_w = None  # the first group's product starts it: no zero-filled (V, C) array to add that to
            grad_b = torch.zeros(V, dtype=acc, device=x.device) if need_b else None
            total = torch.zeros((), dtype=acc, device=x.device)
            rows = max(1, min(chunk_rows, len(kept)))
            group = min(rows * max(1, buffer_bytes // (rows * V * dtype.itemsize)), max(1, len(kept)))
            # Buffers made once and reused: a fresh tens-of-MB array per chunk costs page faults on a CPU.
            logits = torch.empty(rows, V, dtype=dtype, device=x.device)
            logp = torch.empty(rows, V, dtype=acc, device=x.device)
            grads = torch.empty(group, V, dtype=dtype, device=x.device) if need_w else None
            for group_start in range(0, len(kept), group):
                group_index = slice(group_start, group_start + group) if every_row else kept[group_start:][:group]
                hs, ts = x[group_index].to(dtype), targets[group_index]
                for start in range(0, len(ts), rows):
                    h, t = hs[start:start + rows], ts[start:start + rows]
                    n = len(t)
                    z = torch.mm(h, w.T, out=logits[:n]) if b is None else torch.addmm(b, h, w.T, out=logits[:n])
                    if cap is not None:
                        capped = torch.tanh(z.to(acc) / cap)
                        z = capped * cap
                    lp = torch.log_softmax(z, dim=-1, dtype=acc, out=logp[:n])
                    total -= lp.gather(1, t[:, None]).sum()
                    if not (need_x or need_w or need_b):
                        continue
                    # d loss / d z = softmax(z) - onehot(t)
                    g = lp.exp_()
                    g[torch.arange(n, device=t.device), t] -= 1
                    if cap is not None:
                        g.mul_(1 - capped * capped)
                    if need_b:
                        grad_b += g.sum(0)
                    g = grads[start:start + n].copy_(g) if need_w else g.to(dtype)
                    if need_x:
                        index = slice(group_start + start, group_start + start + n) if every_row else \
                            kept[group_start + start:][:n]
                        grad_x[index] = (g @ w).to(grad_x.dtype)  # bf16 products into float32 x under autocast
                if need_w:
                    g = grads[:len(ts)]
                    if grad_w is None:
                        # One group (a finetuning batch, often): the matmul's own float32 sum, rounded once, is the
                        # gradient; a bf16 copy skips two (V, C) float32 passes here and two in backward.
                        one_group = group_start + group >= len(kept)
                        grad_w = torch.mm(g.T, hs) if one_group or dtype == acc else torch.mm(g.T, hs).to(acc)
                    elif dtype == acc:
                        grad_w.addmm_(g.T, hs)
                    else:
                        grad_w += torch.mm(g.T, hs)
            if need_w and grad_w is None:  # every target ignored
                grad_w = torch.zeros_like(weight)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_x is None else grad_x * grad_total,
                None if grad_w is None else (grad_w * grad_total).to(w_dtype),
                None if grad_b is None else (grad_b * grad_total).to(b_dtype),
                None, None, None, None, None, None, None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except on the CPU in float32 where no gradient is needed (decoding, where a step multiplies a few rows
    by every matrix and is bound by reading them; bench/RESULTS.md):
    - one or two rows times a weight stored column-major (generation.use_decode_layout for a few sequences): the CPU
      BLAS would multiply them on one thread while the other cores wait, so the weight's columns are cut into one
      block per thread and bmm multiplies the blocks in parallel: the same dot products (to the last bit but for
      some one-row products with a bias, which the BLAS adds in another kernel);
    - otherwise oneDNN's inner product (torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's CPU backend
      calls), which reads the weights of a decode step of 4-32 rows 1.3-1.5x faster than F.linear's sgemm
      (bench/decode_matmul.py): the same dot products to float32 rounding, summed in another order."""
    N, K = weight.shape
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias)
    parts, rows = torch.get_num_threads(), x.numel() // K
    if weight.stride(0) == 1 and rows <= 2 and parts > 1 and N % parts == 0:
        blocks = weight.t().as_strided((parts, K, N // parts), (N // parts, weight.stride(1), 1))  # views, no copy
        xs = x.reshape(1, rows, K).expand(parts, rows, K)
        y = torch.bmm(xs, blocks) if bias is None else torch.baddbmm(bias.view(parts, 1, N // parts), xs, blocks)
        return y.transpose(0, 1).reshape(*x.shape[:-1], N)
    if ONEDNN_LINEAR and not torch.compiler.is_compiling():  # compiled: inductor picks its own kernel
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# oneDNN ships in torch's x86 and ARM builds; the check keeps other builds on F.linear
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ---------------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA scaling (Kalajdzievski 2023, arXiv:2312.03732) and DoRA (Liu et
# al. 2024, arXiv:2402.09353), as a module swap: add_lora replaces the targeted Linears by LoRALinear, which registers
# the same `weight` and `bias` Parameters under the same names, so a base checkpoint loads unchanged and only `lora_*`
# keys are new. merge_lora folds the update into the weight and swaps a plain nn.Linear back.

# Short target name -> (the module that owns the projection, its attribute). MoE experts are MLPs, so gate/up/down
# adapt every expert too; the router is never adapted. lm_head does not exist when the embeddings are tied.
LORA_TARGETS = {"q": (Attention, "q_proj"), "k": (Attention, "k_proj"), "v": (Attention, "v_proj"),
                "o": (Attention, "o_proj"), "gate": (MLP, "gate_proj"), "up": (MLP, "up_proj"),
                "down": (MLP, "down_proj"), "lm_head": (GPT, "lm_head")}


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r, or alpha / sqrt(r) with use_rslora
    dropout: float = 0.0  # dropout on the input of the LoRA branch only (the base sees x unchanged)
    targets: tuple[str, ...] = ("q", "v")  # projections to adapt, from LORA_TARGETS
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (rsLoRA)
    use_dora: bool = False  # DoRA: a learned magnitude per output row times the row-normalised W + scaling * B @ A

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise InputError(f"--lora.targets {list(self.targets)}: unknown target(s) {unknown or '(none given)'}; "
                             f"choose from {', '.join(LORA_TARGETS)}")
        if self.r < 1:
            raise InputError(f"--lora.r {self.r}: expected a rank of at least 1")
        if self.alpha <= 0:
            raise InputError(f"--lora.alpha {self.alpha}: expected a positive number")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--lora.dropout {self.dropout}: expected a probability in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))). DoRA: y = m * (W + scaling * B A) x / ||W + scaling * B A|| + bias,
    the norm taken per output row and treated as a constant in the backward pass (DoRA section 4.3, as PEFT does).

    The base is an nn.Linear or a quantised layer from quantize.py (anything with in_features, out_features, weight,
    bias, forward and dequantize()). Its weight and bias Parameters are registered here under their own names, so the
    state dict reads `q_proj.weight` as before the swap. A float base is then computed with F.linear and dropped. A
    quantised base is kept as a plain attribute, not a submodule (that would rename its weight `q_proj.base.weight`),
    and called for its output, because bitsandbytes keeps matmul state on the layer."""

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        if type(base) is not nn.Linear and not hasattr(base, "dequantize"):
            raise TypeError(f"LoRALinear wraps nn.Linear or a quantize.py layer, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling, self.dropout, self.use_dora = config.scaling, config.dropout, config.use_dora
        self.disabled = False  # the base layer alone (lora_disabled): a LoRA policy's reference model
        self.weight, self.bias = base.weight, base.bias
        object.__setattr__(self, "base", None if type(base) is nn.Linear else base)  # bypass submodule registration
        w = base.weight
        # The adapter trains in float32 whatever the base's dtype (bf16, or a quantised one), as PEFT's does: in bf16
        # its small updates would round away (DoRA's magnitudes, near 1, would never move)
        dtype = torch.promote_types(w.dtype, torch.float32) if w.is_floating_point() else torch.float32
        # A as nn.Linear and PEFT initialise it (kaiming uniform, a=sqrt(5)); B = 0, so at init the layer is the base
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, device=w.device, dtype=dtype))
        if config.use_dora:
            # m = ||W|| per output row: the same computation the forward divides by, so m / norm is exactly 1 at init
            self.lora_magnitude = nn.Parameter(torch.linalg.norm(self.base_weight().detach().to(dtype), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.base is None else self.base_forward(x)
        if self.disabled:
            return y
        A, B = self.lora_A, self.lora_B
        h = x.to(A.dtype)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        lora = F.linear(F.linear(h, A), B) * self.scaling
        if not self.use_dora:
            return y + lora.to(y.dtype)
        with torch.no_grad():  # "treating ||V + dV||_c as a constant, thereby detaching it from the gradient graph"
            norm = torch.linalg.norm(self.base_weight().to(A.dtype) + self.scaling * (B @ A), dim=1)
        g = self.lora_magnitude / norm  # (out_features,)
        if self.dropout and self.training:
            # PEFT's DoRA: under dropout the magnitude's correction (g - 1) W x reads the dropped input too
            wx = F.linear(h, self.base_weight().to(h.dtype))
        else:
            wx = y if self.bias is None else y - self.bias
        # = g * (W x + lora) + bias, written as PEFT does so that g = 1, B = 0 adds exact zeros to y
        return y + ((g - 1) * wx + g * lora).to(y.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base.weight is not self.weight or self.base.bias is not self.bias:
            raise RuntimeError("LoRALinear: the weight or bias was replaced after add_lora (load_state_dict with "
                               "assign=True?); load the base weights first, then quantize, then add_lora")
        return self.base(x)

    def base_weight(self) -> torch.Tensor:
        """W (out_features, in_features) as floats: a quantised base dequantises it."""
        return self.weight if self.base is None else self.base.dequantize()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (up to rounding), built in at least float32."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        w = self.base_weight().to(dtype) + self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        if self.use_dora:
            w = (self.lora_magnitude.to(dtype) / torch.linalg.norm(w, dim=1))[:, None] * w
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(self.weight.dtype if self.base is None else self.lora_A.dtype),
                                     requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if self.base is not None:  # not a submodule, so nn.Module.train does not reach it
            self.base.train(mode)
        return self

    def extra_repr(self) -> str:
        base = "" if self.base is None else f", base={type(self.base).__name__}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}{base}")


def add_lora(model: GPT, lora: LoRAConfig) -> None:
    """Swap the targeted Linears for LoRALinear in place; afterwards only lora_* parameters are trainable."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers")
    if "lm_head" in lora.targets and model.lm_head is None:
        # An error, not a skip: a silently skipped target would train something other than what was asked for.
        raise ValueError("LoRA target 'lm_head': this model ties its output head to the embedding (tie_embeddings), "
                         "so there is no lm_head to adapt; remove 'lm_head' from targets")
    for target in lora.targets:
        owner_type, attr = LORA_TARGETS[target]
        owners = [m for m in model.modules() if isinstance(m, owner_type) and getattr(m, attr, None) is not None]
        if not owners:
            raise ValueError(f"LoRA target {target!r}: this model has no {attr} (Config.mlp={model.config.mlp!r})")
        for owner in owners:
            setattr(owner, attr, LoRALinear(getattr(owner, attr), lora))
    mark_only_lora_trainable(model)


@contextmanager
def lora_disabled(model: nn.Module):
    """Inside: the model computes as its base, every LoRALinear its base layer alone (a LoRA policy's reference)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def is_lora_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("lora_")


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_key(name))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear into its weight and put a plain nn.Linear back: the state dict is the base's again."""
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, LoRALinear):
                setattr(owner, name, child.merged())


def lora_summary(model: nn.Module) -> str:
    """Trainable and total parameters; a quantised weight counts the in * out values it stands for, not its bytes."""
    trainable = total = 0
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if name == "weight" and hasattr(module, "in_features"):  # a 4-bit weight packs two values per byte
                n = module.in_features * module.out_features
            total += n
            trainable += n if p.requires_grad else 0
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


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
         n_expert_per_token=2, rope_base=1000000.0, router_aux_loss_coef=0.02),
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
