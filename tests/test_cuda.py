"""CUDA paths the CPU suite cannot reach; bench/gpu.sh runs them as `pytest -m cuda tests/test_cuda.py`.

Skipped without a GPU, so the default suite is unchanged; with GPU_SH_REQUIRE_CUDA=1 (gpu.sh outside its dry run) a
missing GPU fails them instead, so a machine whose torch cannot see its GPU is never reported as a pass.
Tolerances: bf16 keeps 8 significant bits, a relative step of 2^-8 = 0.4% per rounding; the comparisons below allow
a few such steps accumulated over a layer or a short run (stated at each).
"""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, IGNORE_INDEX, Config, LoRAConfig, add_lora, linear_cross_entropy

REQUIRED = os.environ.get("GPU_SH_REQUIRE_CUDA") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRED,
                                                   reason="no CUDA device (bench/gpu.sh runs these on a GPU)")]
# A small Llama shape with grouped-query attention: head_dim 32, 4 query heads per key/value head
SMALL = dict(name="cuda-test", n_layer=2, n_head=8, n_kv_head=2, n_embd=256, intermediate_size=512, vocab_size=1024,
             block_size=256)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cuda_is_there():
    assert torch.cuda.is_available(), (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: a CPU "
                                       "wheel, or a driver older than the wheel's CUDA")
    x = torch.ones(4, device="cuda")
    assert (x + x).sum().item() == 8


@pytest.mark.parametrize("groups", ["one", "of one chunk each"])
def test_fused_head_loss_matches_autograd_under_bf16_autocast(groups):
    """linear_cross_entropy's chunked forward and hand-written backward against the plain logits + cross entropy: the
    weight gradient one product over all rows, or one per chunk summed in float32."""
    torch.manual_seed(0)
    N, C, V = 600, 256, 1024  # 600 rows: three chunks of 256, the last one partial
    buffer_bytes = 1 << 27 if groups == "one" else 256 * V * 2
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(V, C, device="cuda")).requires_grad_()
    b = (0.1 * torch.randn(V, device="cuda")).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::7] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, b, targets, buffer_bytes=buffer_bytes)
        logits = F.linear(x, w, b)  # bf16 under autocast, as the fused matmuls are
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    grads = torch.autograd.grad(fused, (x, w, b))
    ref_grads = torch.autograd.grad(ref, (x, w, b))
    assert fused.dtype == torch.float32
    # the same bf16 logits, the softmax in float32 in both: only summation order differs
    assert abs(fused.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-2  # a few bf16 roundings (the fused backward's matmuls run in bf16)


def train_losses(precision: str, steps: int = 8, strategy: str = "auto") -> list[float]:
    """Losses of a few AdamW steps on one fixed batch, set up as pretrain.py sets up a run (Fabric, our precision
    plugin, make_optimizer)."""
    import lightning as L
    from training import make_optimizer, make_strategy, precision_args

    fabric = L.Fabric(accelerator="cuda", devices=1, strategy=make_strategy(strategy, 1, 1),
                      **precision_args(precision))
    fabric.launch()
    torch.manual_seed(0)
    model = GPT(Config(**SMALL))  # on the CPU, the same weights for every precision
    model = fabric.setup_module(model)
    # lr 1e-3: the loss falls every step (7.0 -> 3.4 in 8). At 3e-3 it rose at step 2 and the run was chaotic: scaling
    # the float32 weights by 1 +- 2^-9 alone moved step 7 by 0.7%, and bf16-true on an H200 ended 2.8% off (CPU: 0.3%)
    optimizer = fabric.setup_optimizers(make_optimizer(model.module, 1e-3, 0.0, (0.9, 0.95), fabric.device))
    x = torch.randint(0, SMALL["vocab_size"], (4, 129), generator=torch.Generator().manual_seed(1)).cuda()
    losses = []
    for _ in range(steps):
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_follows_float32(precision):
    reference = train_losses("32-true")
    losses = train_losses(precision)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    # every step within 2% of the float32 loss (7.0 -> 3.4): bf16 rounding of activations (and of the weights
    # for -true, whose optimizer compensates), several steps accumulated
    for step, (a, r) in enumerate(zip(losses, reference)):
        assert abs(a - r) <= 0.02 * r, f"step {step}: {precision} {a:.4f} vs float32 {r:.4f}"
    # and it learns as much: updates smaller than bf16's step must not be lost (DESIGN.md, Precision)
    assert losses[0] - losses[-1] >= 0.8 * (reference[0] - reference[-1]) > 0


def test_fsdp2_on_one_gpu_through_fabric():
    """The FSDP2 path (training.make_strategy("fsdp")): parameters become DTensors, and the steps equal the
    unsharded ones (one rank: the same arithmetic, reordered only by the all-gather/reduce-scatter plumbing)."""
    reference = train_losses("bf16-mixed", steps=4)
    sharded = train_losses("bf16-mixed", steps=4, strategy="fsdp")
    for a, r in zip(sharded, reference):
        assert abs(a - r) <= 1e-2 * r


def test_fsdp2_parameters_are_sharded():
    import lightning as L
    from torch.distributed.tensor import DTensor
    from training import make_strategy

    fabric = L.Fabric(accelerator="cuda", devices=1, strategy=make_strategy("fsdp", 1, 1), precision="bf16-mixed")
    fabric.launch()
    model = fabric.setup_module(GPT(Config(**SMALL)))
    assert all(isinstance(p, DTensor) for p in model.module.parameters())


@pytest.mark.parametrize("mode, tolerance", [("bnb.nf4", 2e-2), ("bnb.nf4-dq", 2e-2), ("bnb.int8", 5e-2)])
def test_bitsandbytes_layer_computes_its_dequantized_weight(mode, tolerance):
    """The CUDA kernels compute x @ W.T for the W the layer stores: 4-bit dequantises to bf16 and multiplies (bf16
    tolerance); LLM.int8() also quantises the activations row-wise to int8 (about 1% per product)."""
    from quantize import quantized_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = quantized_linear(linear, mode, compute_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    ref = x.float() @ layer.dequantize().float().T + linear.bias.float()
    assert y.shape == (4, 16, 512) and y.device.type == "cuda"
    assert rel_err(y, ref) < tolerance
    # and the stored W is the original within the format's error (NF4: 16 levels per block of 64)
    assert rel_err(layer.dequantize(), linear.weight) < (0.15 if "nf4" in mode else 0.02)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_model_forward(mode):
    from quantize import quantize_model

    torch.manual_seed(0)
    model = GPT(Config(**SMALL)).to(torch.bfloat16)
    x = torch.randint(0, SMALL["vocab_size"], (2, 64))
    with torch.no_grad():
        ref = model.cuda()(x.cuda()).float()
        quantize_model(model.cpu(), mode, compute_dtype=torch.bfloat16, device="cuda").to("cuda")
        logits = model(x.cuda()).float()
    assert torch.isfinite(logits).all()
    assert F.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.95  # quantisation error, not garbage


def test_qlora_step_trains_the_adapter_only():
    """finetune_lora.py's QLoRA set-up on the GPU: nf4 base packed on the device, LoRA on every projection,
    bf16-true with float32 adapters, make_optimizer; the loss falls and the packed base does not move."""
    import lightning as L
    from quantize import quantize_model
    from training import make_optimizer, precision_args

    torch.manual_seed(0)
    model = quantize_model(GPT(Config(**SMALL)).to(torch.bfloat16), "bnb.nf4", compute_dtype=torch.bfloat16,
                           device="cuda").to("cuda")
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")))
    fabric = L.Fabric(accelerator="cuda", devices=1, **precision_args("bf16-true"))
    model = fabric.setup_module(model)
    raw = model.module
    optimizer = fabric.setup_optimizers(make_optimizer(raw, 1e-2, 0.0, (0.9, 0.95), fabric.device))
    packed = raw.layers[0].attn.q_proj.weight.data.clone()
    assert all(p.dtype == torch.float32 for n, p in raw.named_parameters() if p.requires_grad)
    x = torch.randint(0, SMALL["vocab_size"], (2, 65), device="cuda")
    losses = []
    for _ in range(6):
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(raw.layers[0].attn.q_proj.weight.data, packed)
    assert raw.layers[0].attn.q_proj.lora_B.abs().sum() > 0


def test_generation_with_and_without_compile_gives_the_same_greedy_tokens():
    """generate.py --compile (each block compiled with dynamic shapes) against eager. Float32, so that the few ulps
    by which fused kernels differ cannot flip an argmax between near-equal logits (in bf16 they can)."""
    from generation import generate, use_decode_layout

    torch.manual_seed(0)
    model = use_decode_layout(GPT(Config(**SMALL)).cuda().eval())
    prompts = [[5, 17, 300, 42, 7, 99], [8, 1, 2]]  # different lengths: the left-padded path too
    eager = generate(model, prompts, 24) + generate(model, prompts[:1], 24)
    for block in model.layers:
        block.compile(dynamic=True)
    compiled = generate(model, prompts, 24) + generate(model, prompts[:1], 24)
    assert compiled == eager
    assert all(len(row) == 24 for row in eager)


def test_sdpa_runs_the_flash_or_efficient_kernel():
    """Training forward and backward in bf16 with SDPA restricted to FlashAttention (it raises when it cannot run,
    e.g. if the model passed a mask or a layout it does not take), and the decode step with the KV cache
    restricted to Flash or memory-efficient attention: never the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(Config(**SMALL)).cuda().to(torch.bfloat16)
    x = torch.randint(0, SMALL["vocab_size"], (2, 129), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(x[:, :-1], targets=x[:, 1:]).backward()
    model.set_kv_cache(2, 64)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(x[:, :16], input_pos=torch.arange(16, device="cuda"))  # prefill: causal, no mask
        logits = model(x[:, 16:17], input_pos=torch.tensor([16], device="cuda"))  # one decode step
    assert torch.isfinite(logits).all()


@pytest.mark.skipif("doc_ids" not in inspect.signature(GPT.forward).parameters,
                    reason="model.py has no packed-batch (doc_ids) path yet")
def test_packing_flex_attention_matches_dense_masks():
    """A packed batch on FlexAttention (compiled, block-sparse; the CUDA default) against the dense block-diagonal
    SDPA masks, forward and gradients. Float32 (TF32 off by default), so only summation order differs."""
    torch.manual_seed(0)
    T = 256  # two FlexAttention blocks of 128
    lengths = [(40, 100, 116), (200, 56)]
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths], device="cuda")
    idx = torch.randint(0, SMALL["vocab_size"], (2, T), device="cuda")
    model = GPT(Config(**SMALL)).cuda()
    results = {}
    for backend in ("sdpa", "flex"):
        model.document_attention = backend
        model.zero_grad(set_to_none=True)
        logits = model(idx, doc_ids=doc_ids)
        model(idx, doc_ids=doc_ids, targets=idx.roll(-1, 1)).backward()
        results[backend] = (logits.detach(), model.layers[0].attn.q_proj.weight.grad.clone())
    assert rel_err(results["flex"][0], results["sdpa"][0]) < 1e-4
    assert rel_err(results["flex"][1], results["sdpa"][1]) < 1e-3
