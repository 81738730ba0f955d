"""LoRA, rsLoRA and DoRA (model.py), LoRA over bitsandbytes-quantised bases (quantize.py), adapter directories
(checkpoint.py) and convert/merge_lora.py. All on the CPU with the tiny-test preset."""

import copy
import math
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
import yaml

from checkpoint import LORA_CONFIG, LORA_WEIGHTS, load_lora_model, load_model, save_checkpoint, save_lora
from conftest import ROOT
from model import (GPT, LORA_TARGETS, Config, InputError, LoRAConfig, LoRALinear, add_lora, is_lora_key,
                   lora_state_dict, lora_summary, merge_lora)
from quantize import MODES, quantize_model

ALL_TARGETS = tuple(LORA_TARGETS)
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
# float32 logits of the same sum computed in two groupings (x(W + sBA) vs xW + s(xA)B): a few ulps (1.2e-7 relative
# each) per matmul, through 2 blocks; 1e-5 against logits of size ~1 leaves room and still catches any real mismatch
MERGE_TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices of 64 x 128 gain nothing from threads, and on a busy machine waiting for them cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("tiny-test", **overrides))


def batch(seed: int = 0, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def train(model: GPT, idx: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on next-token loss over one fixed batch: after one step every B entry is about +-lr (Adam's first step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- LoRA on a float base ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_at_init_leaves_logits_exactly_unchanged(variant):
    model = tiny_model()
    idx = batch()
    before = model(idx)
    add_lora(model, LoRAConfig(targets=ALL_TARGETS, dropout=0.1, **VARIANTS[variant]))
    model.train()  # dropout active: it only feeds the branch that B = 0 zeroes
    assert torch.equal(model(idx), before)


@pytest.mark.parametrize("use_dora", [False, True])
def test_only_lora_parameters_train_and_the_summary_counts_them(use_dora):
    model = tiny_model()
    c = model.config
    base_total = sum(p.numel() for p in model.parameters())
    add_lora(model, LoRAConfig(r=4, targets=("q", "v", "down"), use_dora=use_dora))
    # r * (in + out) per adapted matrix (A is r x in, B is out x r), plus the magnitude vector (out) for DoRA
    shapes = [(c.n_embd, c.n_head * c.head_dim), (c.n_embd, c.n_kv_head * c.head_dim), (c.intermediate_size, c.n_embd)]
    expected = c.n_layer * sum(4 * (i + o) + (o if use_dora else 0) for i, o in shapes)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    summary = lora_summary(model)
    assert f"{expected:,} of {base_total + expected:,}" in summary


def test_state_dict_keeps_base_names_and_adds_only_lora_keys():
    model = tiny_model(qkv_bias=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoRAConfig(targets=ALL_TARGETS, use_dora=True))
    state = model.state_dict()
    assert {k for k in state if not is_lora_key(k)} == set(base_state)
    assert "layers.0.attn.q_proj.weight" in state and "layers.0.attn.q_proj.bias" in state
    assert {"layers.0.attn.q_proj.lora_A", "layers.0.attn.q_proj.lora_B", "layers.0.attn.q_proj.lora_magnitude",
            "lm_head.lora_A"} <= set(lora_state_dict(model))
    # the base checkpoint loads unchanged: only the lora_* keys are missing
    result = model.load_state_dict(base_state, strict=False)
    assert not result.unexpected_keys and all(is_lora_key(k) for k in result.missing_keys)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_model_equals_the_adapted_one(variant):
    model = tiny_model(qkv_bias=True, mlp_bias=True, lm_head_bias=True)
    base_keys = set(model.state_dict())
    add_lora(model, LoRAConfig(targets=ALL_TARGETS, **VARIANTS[variant]))
    idx = batch()
    train(model, idx, steps=1)
    assert all(m.lora_B.abs().min() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    model.eval()
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        merged = model(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(merged, adapted, **MERGE_TOL)


def test_moe_experts_are_adapted_and_the_router_is_not():
    model = tiny_model(mlp="moe", n_expert=4, n_expert_per_token=2)
    idx = batch()
    before = model(idx)
    add_lora(model, LoRAConfig(targets=("q", "gate", "up", "down"), use_dora=True))
    moe = model.layers[0].mlp
    assert all(isinstance(e.up_proj, LoRALinear) for e in moe.experts)
    assert type(moe.router) is torch.nn.Linear and not moe.router.weight.requires_grad
    assert torch.equal(model(idx), before)
    train(model, idx, steps=1)
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), adapted, **MERGE_TOL)


def lora_layer(in_features=24, out_features=20, r=4, alpha=6.0, **kwargs) -> tuple[LoRALinear, torch.nn.Linear]:
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, dtype=torch.float64)
    layer = LoRALinear(base, LoRAConfig(r=r, alpha=alpha, targets=("q",), **kwargs))
    with torch.no_grad():  # as after training: B nonzero, m moved away from ||W||
        layer.lora_B.normal_()
        if layer.use_dora:
            layer.lora_magnitude.mul_(torch.rand(out_features, dtype=torch.float64) + 0.5)
    return layer, base


@pytest.mark.parametrize("variant", VARIANTS)
def test_scaling_and_dora_against_their_formulas_in_float64(variant):
    r, alpha = 4, 6.0
    layer, base = lora_layer(r=r, alpha=alpha, **VARIANTS[variant])
    s = alpha / math.sqrt(r) if variant == "rslora" else alpha / r  # rsLoRA: alpha / sqrt(r); LoRA and DoRA: alpha / r
    assert layer.scaling == s
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    if variant == "dora":
        # Liu et al. (2024) eq. 5: W' = m * V / ||V||_c with V = W + s B A; ||.||_c is the norm of each output row of
        # our (out, in) weight (PEFT: torch.linalg.norm(weight, dim=1)), held constant in the backward pass (sec. 4.3)
        V = W + s * B @ A
        expected = x @ (layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + b
    else:
        expected = x @ W.T + b + s * (x @ A.T) @ B.T
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # same gradients: the norm gets none
    grads = torch.autograd.grad(got.square().sum(), [p for p in layer.parameters() if p.requires_grad])
    grads_expected = torch.autograd.grad(expected.square().sum(), [p for p in layer.parameters() if p.requires_grad])
    for g, e in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_rslora, dropout", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_dora_equals_peft(use_rslora, dropout):
    """The same weights in PEFT's DoRA layer give the same initial magnitude, outputs and gradients; with dropout in
    train mode too (the same seed draws the same mask in both; PEFT drops the magnitude correction's input too)."""
    peft = pytest.importorskip("peft")
    layer, base = lora_layer(use_dora=True, use_rslora=use_rslora, dropout=dropout)
    reference = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(
        r=4, lora_alpha=6.0, target_modules=["0"], use_dora=True, use_rslora=use_rslora, lora_dropout=dropout))
    layer.train(), reference.train()
    peft_layer = reference.base_model.model[0]
    fresh = LoRALinear(copy.deepcopy(base), LoRAConfig(r=4, alpha=6.0, use_dora=True))  # our m at init, same W
    torch.testing.assert_close(peft_layer.lora_magnitude_vector["default"].weight, fresh.lora_magnitude)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)
    theirs = reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours_grads = torch.autograd.grad(ours.square().sum(), [layer.lora_A, layer.lora_B, layer.lora_magnitude])
    their_params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                    peft_layer.lora_magnitude_vector["default"].weight]
    their_grads = torch.autograd.grad(theirs.square().sum(), their_params)
    for g, e in zip(ours_grads, their_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_bad_targets_are_one_line_errors():
    with pytest.raises(ValueError, match="'qq'.*q, k, v, o, gate, up, down, lm_head") as e:
        LoRAConfig(targets=("q", "qq"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="tie"):
        add_lora(tiny_model(tie_embeddings=True), LoRAConfig(targets=("q", "lm_head")))
    with pytest.raises(ValueError, match="gate_proj"):
        add_lora(tiny_model(mlp="plain"), LoRAConfig(targets=("gate",)))


# ---- LoRA on a quantised base (QLoRA) ----------------------------------------------------------------------------

def quantized_layers(model: GPT) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "dequantize")}


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq", "bnb.int8"])
def test_qlora_trains_with_the_base_frozen_and_quantised(mode):
    model = quantize_model(tiny_model(), mode)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks; not embed or lm_head
    frozen = {n: m.weight.data.clone() for n, m in layers.items()}
    add_lora(model, LoRAConfig(targets=("q", "k", "v", "o", "gate", "up", "down"), use_dora=True))
    losses = train(model, batch(), steps=6)
    # a fixed batch and 6 Adam steps at lr 1e-2: each step lowers the loss
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    for name, m in layers.items():
        assert type(m.weight) is (bnb.nn.Int8Params if mode == "bnb.int8" else bnb.nn.Params4bit)
        assert m.weight.dtype == (torch.int8 if mode == "bnb.int8" else torch.uint8)
        assert not m.weight.requires_grad and m.weight.grad is None
        assert torch.equal(m.weight.data, frozen[name])
    # the hidden base follows train/eval (bitsandbytes' int8 matmul reads it)
    model.eval()
    assert not model.layers[0].attn.q_proj.base.training


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq"])
def test_an_eval_pass_leaves_4bit_weights_and_qlora_gradients_unchanged(mode):
    """On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a 4-bit weight for its inference kernel at the first eval
    forward without gradients: the next training step's gradients stopped at the layer (that kernel has no backward),
    and unpacking it (to save or merge) gave other weights. quantize.Linear4bit never lets it pack. (On a host
    without that kernel bitsandbytes never packs, and this holds trivially.)"""
    model = quantize_model(tiny_model(n_embd=128), mode)  # rows of 128: two 64-value blocks of scales each
    add_lora(model, LoRAConfig(targets=("q", "v")))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A's gradient 0 and the path through the adapters untested
            torch.nn.init.normal_(p, std=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = quantized_layers(model).values()
    idx = batch()

    def gradients() -> list[torch.Tensor]:
        logits = model(idx[:, :-1])
        return torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()), trainable)

    expected, weights = gradients(), [m.dequantize() for m in layers]
    model.eval()
    with torch.no_grad():
        model(idx)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    for got, want in zip(gradients(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for m, weight in zip(layers, weights, strict=True):
        assert torch.equal(m.dequantize(), weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_generation_takes_the_cpu_inference_kernel_only_for_bf16_compute(dtype):
    """use_decode_layout lets bitsandbytes pack 4-bit layers for its AVX512-BF16 CPU kernel (which multiplies in bf16)
    where the compute dtype is bf16 and the CPU has that kernel; the logits stay those of the unpacked layers within
    bf16 rounding (the kernel keeps the block scales in bf16). Elsewhere nothing is packed."""
    from generation import use_decode_layout
    model = quantize_model(tiny_model(n_embd=128).to(dtype), "bnb.nf4", compute_dtype=dtype).eval()
    idx = batch()
    with torch.no_grad():
        expected = model(idx).float()
        use_decode_layout(model)
        logits = model(idx).float()
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized_layers(model).values()]
    assert set(packed) == {dtype == torch.bfloat16 and bnb.functional.has_avx512bf16()}
    assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()  # 0.7 % on the AVX512-BF16 host


def test_qlora_merge_and_state_dict_names():
    float_total = sum(p.numel() for p in tiny_model().parameters())
    model = quantize_model(tiny_model(), "bnb.nf4")
    names = set(model.state_dict())
    add_lora(model, LoRAConfig(targets=("q", "v", "down"), use_dora=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,} of {float_total + trainable:,}" in lora_summary(model)  # 4-bit weights count as values
    assert "layers.0.attn.q_proj.weight" in model.state_dict()
    assert set(lora_state_dict(model)) | names >= set(model.state_dict())
    idx = batch()
    train(model, idx, steps=1)
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)  # over a 4-bit base: into the dequantised weight, as a float nn.Linear
        assert type(model.layers[0].attn.q_proj) is torch.nn.Linear
        # the 4-bit matmul dequantises to float32 on the CPU too, so only the grouping of the sums differs
        torch.testing.assert_close(model(idx), adapted, **MERGE_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_dequantised_weights_are_within_the_codes_rounding_bound(mode):
    float_model = tiny_model()
    model = quantize_model(tiny_model(), mode)
    for name, layer in quantized_layers(model).items():
        W, Wq = float_model.get_submodule(name).weight.detach(), layer.dequantize()
        if mode == "bnb.int8":
            # round(127 * w / rowmax) of the float16 weight: half a step of rowmax / 127, plus float16 rounding
            rowmax = W.abs().amax(1, keepdim=True)
            bound = 0.5 / 127 * rowmax * (1 + 2**-10) + 2**-11 * W.abs() + 1e-8
        else:
            # the nearest of the code's 16 levels times its block's absmax (blocks of 64): off by at most half the
            # widest gap between levels. Double quantisation ("-dq") also rounds the stored absmax; the block's
            # largest weight sits on level +-1, so the dequantised block's max is that stored absmax
            half_gap = layer.weight.quant_state.code.sort().values.diff().max() / 2
            blockmax = W.reshape(-1, 64).abs().amax(1, keepdim=True)
            stored_max = Wq.reshape(-1, 64).abs().amax(1, keepdim=True)
            bound = half_gap * blockmax * (1 + 1e-5) + (stored_max - blockmax).abs() + 1e-8
            bound = bound.expand(-1, 64).reshape(W.shape)
        assert ((Wq - W).abs() <= bound).all(), name


@pytest.mark.parametrize("mode", MODES)
def test_quantised_logits_are_close_to_float_logits(mode):
    float_model = tiny_model()
    idx = batch(B=4, T=32)
    model = quantize_model(tiny_model(), mode)
    with torch.no_grad():
        expected, got = float_model(idx), model(idx)
    # Tolerance from the weights themselves: a matmul whose weight has relative (Frobenius) error eps gives outputs
    # with relative error about eps; the residual stream also carries the unquantised embedding, so the logits'
    # relative error should stay below the largest eps of any layer (measured: about half of it, for every mode).
    eps = max(((m.dequantize() - float_model.get_submodule(n).weight).norm() / float_model.get_submodule(n).weight
               .norm()).item() for n, m in quantized_layers(model).items())
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < eps, (error, eps)
    assert eps < (0.01 if mode == "bnb.int8" else 0.15)  # 255 levels per row vs 16 per block of 64


def test_unknown_quantize_mode_is_a_one_line_error():
    with pytest.raises(ValueError) as e:
        quantize_model(tiny_model(), "bnb.nf5")
    assert "'bnb.nf5'" in str(e.value) and "bnb.nf4-dq" in str(e.value) and "\n" not in str(e.value)


# ---- adapter directories and convert/merge_lora.py ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data_prep import train_tokenizer
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    train_tokenizer.main(inputs=str(root / "corpus.txt"), out_dir=root / "tok", vocab_size=260)
    return root / "tok"


@pytest.fixture
def run(tmp_path, tokenizer_dir):
    """A saved tiny base checkpoint and a trained DoRA adapter on every target, with its tokenizer files."""
    base = tiny_model(qkv_bias=True)
    save_checkpoint(tmp_path / "base", base.config, base.state_dict(), tokenizer_dir=tokenizer_dir)
    lora = LoRAConfig(r=4, alpha=8.0, targets=ALL_TARGETS, use_dora=True)
    add_lora(base, lora)
    train(base, batch(), steps=2)
    save_lora(tmp_path / "lora", lora, lora_state_dict(base), base_checkpoint_dir=tmp_path / "base",
              tokenizer_dir=tokenizer_dir)
    return tmp_path, base.eval()


def test_adapter_directory_round_trip(run):
    root, adapted = run
    assert yaml.safe_load((root / "lora" / LORA_CONFIG).read_text())["base_checkpoint_dir"] == str(root / "base")
    model, base_dir = load_lora_model(root / "lora")
    assert base_dir == root / "base"
    idx = batch()
    with torch.no_grad():
        assert torch.equal(model(idx), adapted(idx))
    # on a 4-bit base: the same as quantising and adapting by hand
    quantized, _ = load_lora_model(root / "lora", quantize="bnb.nf4")
    by_hand = quantize_model(load_model(root / "base"), "bnb.nf4")
    add_lora(by_hand, LoRAConfig(r=4, alpha=8.0, targets=ALL_TARGETS, use_dora=True))
    by_hand.load_state_dict(lora_state_dict(adapted), strict=False)
    with torch.no_grad():
        assert torch.equal(quantized(idx), by_hand(idx))
    with pytest.raises(InputError, match="bnb.nf5"):
        load_lora_model(root / "lora", quantize="bnb.nf5")


def merge_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert.merge_lora", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_merge_lora_cli_end_to_end(run):
    root, adapted = run
    result = merge_cli("--lora_dir", root / "lora", "--out_dir", root / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_model(root / "merged")
    assert set(merged.state_dict()) == set(load_model(root / "base").state_dict())
    assert (root / "merged" / "tokenizer.json").read_bytes() == (root / "lora" / "tokenizer.json").read_bytes()
    idx = batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted(idx), **MERGE_TOL)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_merge_lora_bad_inputs_are_one_line(run):
    from convert.merge_lora import merge  # what the CLI runs; its InputErrors become "error: <message>"
    root, _ = run
    config = yaml.safe_load((root / "lora" / LORA_CONFIG).read_text())

    def error(out_dir=root / "out", **config_changes) -> str:
        (root / "lora" / LORA_CONFIG).write_text(yaml.safe_dump({**config, **config_changes}))
        with pytest.raises(InputError) as e:
            merge(lora_dir=root / "lora", out_dir=out_dir)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "'qq'" in error(targets=["q", "qq"]) and LORA_CONFIG in error(targets=["q", "qq"])
    assert "base_checkpoint_dir" in error(base_checkpoint_dir=str(root / "nowhere"))
    assert "rank" in error(r=0)
    assert "would replace" in error(out_dir=root / "lora" / ".." / "lora")
    (root / "lora" / LORA_CONFIG).write_text(yaml.safe_dump(config))
    (root / "lora" / LORA_WEIGHTS).unlink()
    assert LORA_WEIGHTS in one_line_error(merge_cli("--lora_dir", root / "lora", "--out_dir", root / "out"))
    assert not (root / "out").exists()
