"""Sampling with the KV cache: the loop generate.py, evaluate.py (generate_until) and the finetuning scripts'
sample prints share. Prompts of different lengths are left-padded into one batch and each row is told its
padding, so a batched row produces the same tokens as the prompt alone (tests/test_generate.py).
"""

import mmap
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from model import GPT, MLP, Attention, InputError, linear


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """logits (B, vocab_size) of the next token -> token ids (B,). temperature 0 is greedy (argmax).
    generator: one for the batch, or a list of one per row, where consecutive rows holding the same generator draw
    together from it (a row's draws then depend on its generator alone, not on which other rows share the batch)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
    if not isinstance(generator, list):
        return draw(cdf, torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype))
    uniform, start = torch.empty(len(cdf), 1, device=cdf.device, dtype=cdf.dtype), 0
    while start < len(cdf):
        end = start + 1
        while end < len(cdf) and generator[end] is generator[start]:
            end += 1
        uniform[start:end] = torch.rand(end - start, 1, generator=generator[start], device=cdf.device, dtype=cdf.dtype)
        start = end
    return draw(cdf, uniform)


def draw(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-transform sampling: each row's first token whose cumulative probability (float64) exceeds its uniform
    draw (B, 1) in [0, 1) scaled to the row's total. One uniform a row where torch.multinomial draws an exponential per
    vocabulary entry (~10 ms a step for 8 rows of 49k on a CPU). A token of probability 0 is never drawn: its
    cumulative value equals its predecessor's, and a draw that rounds up to the total takes the last token with
    probability above 0."""
    total = cdf[:, -1:].contiguous()
    token = torch.searchsorted(cdf, uniform * total, right=True)
    return torch.minimum(token, torch.searchsorted(cdf, total)).squeeze(-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top_k largest and outside the smallest set whose probability
    reaches top_p (nucleus). The most likely token always survives, so a row is never empty."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # the most likely token, even at top_p 0 (where nothing before it "reaches" 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def use_decode_layout(model: GPT, rows: int = 1) -> GPT:
    """Lay the weights out for decoding `rows` sequences together, keeping values, shapes and state-dict keys: q/k/v
    and gate/up stacked into one matrix each (fuse_projections), and, on the CPU in float32, every matrix a decode step
    multiplies in memory backed by 2 MB pages, with the Linear layers swapped for DecodeLinear (model.linear). A
    decode step multiplies one row per sequence by every matrix and is bound by reading them:
    - 2 MB pages spare a token's stream of weights one TLB miss per 4 KB (page walks are dearest in a VM);
    - for fewer than 8 rows each matrix is stored column-major (the transposed matrix contiguous, viewed back at its
      own shape): the BLAS reads W^T faster than W for a matrix-vector product, and model.linear splits its columns
      into one block per thread (the BLAS would give it one thread) for one or two rows, oneDNN multiplies more;
    - from 8 rows on (batched sampling, RL rollouts) they stay row-major: oneDNN (model.linear) reads the two layouts
      at the same speed at 8 rows, row-major 1.1-1.4x faster at 16-32 (bench/decode_matmul.py).
    4-bit layers computing in bf16 on a CPU with AVX512-BF16 take bitsandbytes' inference kernel
    (quantize.Linear4bit.use_inference_kernel), which cannot train.
    Matmuls over a whole prompt lose a little, so use it for generation, not for scoring or training. Measurements:
    bench/RESULTS.md."""
    for module in model.modules():
        if hasattr(module, "use_inference_kernel"):
            module.use_inference_kernel()
    if model.embed.weight.device.type != "cpu" or model.embed.weight.dtype != torch.float32:
        fuse_projections(model)
        return model
    matrices = [m.weight for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    if model.lm_head is None:  # a tied head multiplies by the embedding table
        matrices.append(model.embed.weight)
    arena = HugePageArena(sum(w.numel() for w in matrices) * 4 + 64 * len(matrices))

    def decode_matrix(n_rows: int, cols: int) -> torch.Tensor:
        if rows < 8:  # column-major
            return arena.take(n_rows * cols).view(cols, n_rows).t()
        return arena.take(n_rows * cols).view(n_rows, cols)

    with torch.no_grad():
        fuse_projections(model, decode_matrix)
        for weight in matrices:
            if not arena.holds(weight):  # not one of the views into a stacked matrix, laid out above
                weight.data = decode_matrix(*weight.shape).copy_(weight)
    for owner in list(model.modules()):  # a module swap, as add_lora and quantize_model do
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear:
                setattr(owner, name, DecodeLinear(child))
    return model


class DecodeLinear(nn.Linear):
    """An nn.Linear whose product is model.linear's (on the CPU in float32: oneDNN, or one or two rows split across the
    threads when the weight is column-major). It holds the swapped layer's own weight and bias Parameters, so the
    state dict is unchanged."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # no new weights: take the layer's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@torch.no_grad()
def fuse_projections(model: GPT, empty: Callable[[int, int], torch.Tensor] | None = None) -> None:
    """Stack each layer's q, k and v weights into one matrix (Attention.qkv_weight), and gate and up into another
    (MLP.gate_up_weight), so a decode step runs one matrix-vector product where it ran three or two, each of which
    pays its own start-up and memory latency. The separate weights become views into the stacked ones, so values,
    the state dict and in-place loads are shared. Only plain nn.Linear projections are stacked, not LoRA or
    quantised ones. empty(rows, cols): the memory for a stacked matrix (default a new contiguous tensor)."""
    def stack(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([layer.weight for layer in layers])
        if empty is not None:
            weight = empty(*weight.shape).copy_(weight)
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        start = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight.data = weight[start:start + rows]
            if bias is not None:
                layer.bias.data = bias[start:start + rows]
            start += rows
        return weight, bias

    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_weight is None:
            layers = [module.q_proj, module.k_proj, module.v_proj]
            if all(type(layer) is nn.Linear for layer in layers):
                module.qkv_weight, module.qkv_bias = stack(layers)
        elif isinstance(module, MLP) and module.config.mlp != "plain" and module.gate_up_weight is None:
            layers = [module.gate_proj, module.up_proj]
            if all(type(layer) is nn.Linear for layer in layers):
                module.gate_up_weight, module.gate_up_bias = stack(layers)


class HugePageArena:
    """One block of float32 CPU memory handed out front to back, which the kernel is asked (madvise) to back with
    transparent huge pages. Where the platform has no MADV_HUGEPAGE, ordinary memory."""

    PAGE = 2 << 20

    def __init__(self, nbytes: int):
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # private: shared anonymous memory is shmem, which has its own (usually off) huge-page setting
            buffer = mmap.mmap(-1, nbytes + self.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buffer.madvise(mmap.MADV_HUGEPAGE)
            memory = torch.frombuffer(buffer, dtype=torch.uint8)  # the tensor keeps the mapping alive
            start = -memory.data_ptr() % self.PAGE
            self.memory = memory[start:start + nbytes]
        else:
            self.memory = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0

    def take(self, numel: int) -> torch.Tensor:
        """An uninitialised float32 tensor of numel values, starting on a 64-byte boundary."""
        start, self.used = self.used, self.used + -(-numel * 4 // 64) * 64
        if self.used > len(self.memory):
            raise RuntimeError(f"HugePageArena: {self.used} bytes asked of {len(self.memory)}")
        return self.memory[start:start + numel * 4].view(torch.float32)

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() == self.memory.untyped_storage().data_ptr()


@torch.inference_mode()
def generate_tokens(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float = 1.0, stop_ids: list[int] = (),
                    generator: torch.Generator | list[torch.Generator] | None = None, pad_id: int = 0,
                    max_seq_length: int | None = None, cached_prefix: int = 0,
                    logprobs: list | None = None, group_size: int = 1) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step, until every row has produced a stop id or
    max_new_tokens. Rows that have stopped keep yielding their stop id, which callers drop.

    logprobs: a list to which each step appends its tokens' log-probabilities (B,) float32 under
    softmax(logits / temperature), before top-k/top-p filtering (the distribution a trainer scores them under;
    temperature 0: the plain softmax), 0 for rows that stopped at an earlier step. RL keeps them to compare with its
    own scoring.

    group_size > 1: the prompts come in runs of group_size identical ones (RL samples a prompt G times): each run's
    prompt is prefilled once and its KV cache copied to the run's rows, a G-th of the prefill's work.

    Slot t of the KV cache holds the t-th token of the left-padded batch. cached_prefix > 0 (one prompt,
    a cache of max_seq_length slots already set): the cache holds that many leading prompt tokens from an
    earlier call, so only the rest is prefilled (chat turns extend the same conversation)."""
    device = model.embed.weight.device
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise InputError("empty prompt: generation needs at least one token to condition on")
    T = max(lengths)
    max_seq_length = max_seq_length or min(T + max_new_tokens, model.config.block_size)
    if T >= max_seq_length:
        raise InputError(f"the prompt has {T} tokens, which leaves no room to generate within the model's "
                         f"block_size of {model.config.block_size} tokens")
    max_new_tokens = min(max_new_tokens, max_seq_length - T)
    pad = torch.tensor([T - n for n in lengths], device=device)
    idx = torch.tensor([[pad_id] * (T - n) + p for n, p in zip(lengths, prompts)], device=device)  # (B, T)
    cache = model.layers[0].attn.kv_cache
    if cached_prefix and (len(prompts) != 1 or cache is None or cache.k.shape[2] != max_seq_length):
        raise ValueError("cached_prefix needs one prompt and the KV cache of an earlier call of the same size")
    shared = group_size > 1 and not cached_prefix
    if shared and (len(prompts) % group_size or any(prompts[i] != prompts[i - i % group_size]
                                                   for i in range(len(prompts)))):
        raise ValueError(f"group_size {group_size}: the prompts are not runs of {group_size} identical ones")
    if not cached_prefix:
        model.set_kv_cache(len(prompts) // group_size if shared else len(prompts), max_seq_length)
    stops = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    # Without padding the plain masks apply (no per-row mask: SDPA's cheaper path).
    row_pad = pad if bool(pad.any()) else None

    cached_prefix = min(cached_prefix, T - 1)  # the last prompt token is always fed: its logits are needed
    if shared:  # one row per run, then each run's cache and logits copied to its rows
        logits = model(idx[::group_size], input_pos=torch.arange(T, device=device),
                       pad=None if row_pad is None else row_pad[::group_size], last_only=True)[:, -1]
        for block in model.layers:
            cache = block.attn.kv_cache
            cache.k, cache.v = (cache.k.repeat_interleave(group_size, 0), cache.v.repeat_interleave(group_size, 0))
        logits = logits.repeat_interleave(group_size, 0)
    else:
        logits = model(idx[:, cached_prefix:], input_pos=torch.arange(cached_prefix, T, device=device), pad=row_pad,
                       last_only=True)[:, -1]
    live = torch.arange(len(prompts), device=device)  # the rows still in the batch, in order
    for t in range(T, T + max_new_tokens):
        # Only rows that have not stopped draw, so a row's draws never depend on when others leave the batch.
        active = ~done[live]
        rows, logits = live[active], logits[active]
        draws = [generator[i] for i in rows.tolist()] if isinstance(generator, list) else generator
        sampled = sample(logits, temperature, top_k, top_p, draws)
        token = torch.full(done.shape, stops[0] if len(stops) else 0, device=device).index_put_((rows,), sampled)
        if logprobs is not None:
            scaled = logits.float() / temperature if temperature else logits.float()
            logps = torch.log_softmax(scaled, dim=-1).gather(1, sampled[:, None]).squeeze(1)
            logprobs.append(torch.zeros(len(prompts), device=device, dtype=torch.float32).index_put_((rows,), logps))
        done |= torch.isin(token, stops)
        yield token
        if bool(done.all()) or t + 1 == T + max_new_tokens:
            break
        # Rows that stopped leave the batch once a quarter of it has (each time, the KV cache is copied): a batch
        # decodes until its longest row ends, and RL completions vary in length.
        kept = (~done[live]).nonzero().squeeze(1)
        if len(live) - len(kept) >= max(1, len(live) // 4):
            for block in model.layers:
                cache = block.attn.kv_cache
                cache.k, cache.v = cache.k[kept], cache.v[kept]
            live = live[kept]
            row_pad = None if row_pad is None else row_pad[kept]
        logits = model(token[live][:, None], input_pos=torch.tensor([t], device=device), pad=row_pad)[:, -1]


def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: list[int] = (),
             on_token: Callable[[int, int], bool] | None = None, **sampling) -> list[list[int]]:
    """The new tokens of each prompt, without the stop id that ended it.

    on_token(row, token) is called for each new token; returning True stops that row (stop strings)."""
    outputs = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for tokens in generate_tokens(model, prompts, max_new_tokens, stop_ids=stop_ids, **sampling):
        for row, token in enumerate(tokens.tolist()):
            if finished[row]:
                continue
            if token in stop_ids:
                finished[row] = True
                continue
            outputs[row].append(token)
            if on_token is not None and on_token(row, token):
                finished[row] = True
        if all(finished):
            break
    return outputs
