import math

import pytest
import torch

from convert.families import config_to_hf
from model import (GPT, IGNORE_INDEX, Config, LoRAConfig, add_lora, attention_masks, configs, linear,
                   linear_cross_entropy, softcapped_attention)

# Parameter counts of the released checkpoints, as the Hugging Face hub reports them for each repository's
# safetensors files (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "Llama-2-7b-hf": 6_738_415_616,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "TinyLlama-1.1B-intermediate-step-1431k-3T": 1_100_048_384,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen2.5-0.5B": 494_032_768,
    "gemma-2-2b": 2_614_341_888,
    "phi-2": 2_779_683_840,
    "Phi-3-mini-4k-instruct": 3_821_079_552,
    "pythia-160m": 162_322_944,
    "SmolLM2-135M": 134_515_008,
}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_preset_parameter_count_equals_release(name):
    with torch.device("meta"):
        assert count_parameters(GPT(Config.from_name(name))) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", [c["name"] for c in configs if c["name"] not in ("tiny-test", "stdlib-llama-6m")])
def test_every_preset_has_the_shape_transformers_builds(name):
    """Each preset, written as a HF config, gives transformers' own model with the same number of parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = Config.from_name(name)
    hf_config = config_to_hf(config)
    hf_config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device("meta"):
        ours, theirs = GPT(config), AutoModelForCausalLM.from_config(hf_config)
    assert count_parameters(ours) == count_parameters(theirs)


def test_preset_names_are_hub_names_and_unique():
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names))
    assert all("/" not in n for n in names)
    with pytest.raises(ValueError, match="Qwen2.5-0.5B"):
        Config.from_name("qwen2.5-0.5")


def test_config_file_round_trip_and_unknown_field(tmp_path):
    import yaml
    config = Config.from_name("gemma-2-2b")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert Config.from_file(tmp_path / "c.yaml") == config
    (tmp_path / "bad.yaml").write_text("n_layer: 2\nn_layers: 3\n")
    with pytest.raises(ValueError, match="n_layers"):
        Config.from_file(tmp_path / "bad.yaml")


def test_init_is_documented_scheme():
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", n_layer=8, n_embd=256, intermediate_size=512)
    model = GPT(config)
    std = 0.02
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    residual_std = std / math.sqrt(2 * config.n_layer)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones(256))
    gemma = GPT(Config.from_name("tiny-test", norm_offset=1.0))
    assert torch.equal(gemma.norm.weight, torch.zeros(64))  # (offset + weight) = 1 at init


def test_sliding_window_mask_against_a_loop():
    config = Config.from_name("tiny-test", sliding_window=3)
    T = 7
    _, sliding = attention_masks(config, torch.arange(T), torch.arange(T), explicit=False)
    for q in range(T):
        for k in range(T):
            assert sliding[q, k].item() == (k <= q and q - k < 3)


def test_softcapped_attention_with_gqa_equals_sdpa_when_cap_is_huge():
    torch.manual_seed(0)
    B, n_head, n_kv_head, T, hd = 2, 6, 2, 9, 8
    q, k, v = torch.randn(B, n_head, T, hd), torch.randn(B, n_kv_head, T, hd), torch.randn(B, n_kv_head, T, hd)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(softcapped_attention(q, k, v, None, hd**-0.5, cap=1e9), expected)


def test_forward_shapes_and_errors():
    model = GPT(Config.from_name("tiny-test"))
    idx = torch.randint(0, 256, (3, 5))
    assert model(idx).shape == (3, 5, 256)
    torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(idx, input_pos=torch.arange(5))


def test_meta_built_model_gets_real_rope_tables():
    with torch.device("meta"):
        model = GPT(Config.from_name("tiny-test"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 256, (1, 4)))).all()


@pytest.mark.parametrize("overrides", [{}, dict(sliding_window=3, sliding_window_period=2, attn_softcap=20.0)])
def test_left_padded_rows_compute_what_each_row_computes_alone(overrides):
    """A batch of prompts of different lengths, left-padded with `pad`: each row's logits equal the row alone,
    in a full forward, in a cached prefill and in the decode step after it (SDPA and the eager softcap path)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-test", **overrides)).eval()
    long, short = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    pad = torch.tensor([0, 4])
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    nxt = torch.randint(0, 256, (2, 1))
    with torch.no_grad():
        alone = [model(torch.cat([long, nxt[:1]], 1))[0], model(torch.cat([short, nxt[1:]], 1))[0]]
        full = model(batch, pad=pad)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        prefill = model(batch, input_pos=torch.arange(9), pad=pad)
        decode = model(nxt, input_pos=torch.tensor([9]), pad=pad)
    for out in (full, prefill):
        torch.testing.assert_close(out[0], alone[0][:-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 4:], alone[1][:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode[:, 0], torch.stack([alone[0][-1], alone[1][-1]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True), dict(lm_head_bias=True),
                                       dict(final_softcap=3.0), "lora_head"])
def test_forward_with_targets_is_the_summed_cross_entropy_with_the_same_gradients(overrides):
    # float64, so that any difference is a bug and not rounding; 2 x 150 positions = chunks of 256 and 44
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", block_size=150, **(overrides if isinstance(overrides, dict) else {}))
    model = GPT(config).double()
    model.init_weights()
    if overrides == "lora_head":  # not a plain Linear: the loss goes through the head's own forward
        add_lora(model, LoRAConfig(targets=("q", "lm_head")))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make the adapter a no-op and its gradient path untested
                torch.nn.init.normal_(p, std=0.1)
        assert model.lm_head.lora_B.abs().sum() > 0
    x = torch.randint(0, config.vocab_size, (2, 150))
    y = torch.randint(0, config.vocab_size, (2, 150))
    y[0, :40] = IGNORE_INDEX  # a prompt
    y[1, -3:] = IGNORE_INDEX  # padding
    params = [p for p in model.parameters() if p.requires_grad]

    if overrides == "lora_head":
        # the reference head written out here, not LoRALinear's forward that the loss path itself calls
        head = model.lm_head
        logits = model.trunk(x) @ (head.weight + head.scaling * head.lora_B @ head.lora_A).T
    else:
        logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.37, params)
    loss = model(x, targets=y)
    grads = torch.autograd.grad(loss * 0.37, params)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(model(x, targets=y), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("buffer_rows", [128, 100, 1000])  # groups of two chunks, of one (rounded down), one group
def test_linear_cross_entropy_in_groups_of_chunks_gives_the_plain_gradients(ignored, buffer_rows):
    # float64: the weight gradient summed over groups of chunks, each group one product, is the plain one exactly
    torch.manual_seed(0)
    x = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(100, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    if ignored:
        t[10:50] = IGNORE_INDEX
        t[-7:] = IGNORE_INDEX
    loss = linear_cross_entropy(x, w, b, t, chunk_rows=64, buffer_bytes=buffer_rows * 100 * 8)
    expected = torch.nn.functional.cross_entropy(x @ w.T + b, t, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(torch.autograd.grad(loss * 0.37, [x, w, b]), torch.autograd.grad(expected * 0.37, [x, w, b])):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_when_every_target_is_ignored():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    loss = linear_cross_entropy(x, w, b, torch.full((5,), IGNORE_INDEX))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, [x, w, b]))


def test_linear_cross_entropy_under_bf16_autocast_and_with_a_frozen_head():
    torch.manual_seed(0)
    x = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, None, t, chunk_rows=128)
        expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), t, reduction="sum")
    gx, gw = torch.autograd.grad(loss, [x, w])
    ex, ew = torch.autograd.grad(expected, [x, w])
    assert loss.dtype == torch.float32 and gx.dtype == gw.dtype == torch.float32
    # the same bf16 matmuls, the softmax in fp32 in both: equal up to bf16 rounding of the gradient products
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gx, ex, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, ew, rtol=2e-2, atol=2e-2)
    # a frozen head (LoRA): no gradient is made for it, and the input's is unchanged
    (gx_frozen,) = torch.autograd.grad(linear_cross_entropy(x, w.detach(), None, t, chunk_rows=128), [x])
    (gx_full,) = torch.autograd.grad(linear_cross_entropy(x, w, None, t, chunk_rows=128), [x])
    torch.testing.assert_close(gx_frozen, gx_full, rtol=0, atol=0)


# one chunk (its product is the gradient); chunks in one group (the same); groups of one chunk (a float32 sum)
@pytest.mark.parametrize("chunk_rows, buffer_bytes", [(512, 1 << 27), (128, 1 << 27), (128, 128 * 100 * 2)])
def test_linear_cross_entropy_with_bf16_weights(chunk_rows, buffer_bytes):
    torch.manual_seed(0)
    x = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(100, 32, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    t[:20] = IGNORE_INDEX
    loss = linear_cross_entropy(x, w, None, t, chunk_rows=chunk_rows, buffer_bytes=buffer_bytes)
    gx, gw = torch.autograd.grad(loss * 0.37, [x, w])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x64 @ w64.T, t, reduction="sum")
    ex, ew = torch.autograd.grad(expected * 0.37, [x64, w64])
    assert loss.dtype == torch.float32 and gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=0)
    # bf16 logits (8 bits of mantissa) feed the softmax: the gradients agree to bf16 rounding
    torch.testing.assert_close(gx.double(), ex, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gw.double(), ew, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("threads", [2, 3])  # 3: 96 columns split in three; 100 do not, and take oneDNN
@pytest.mark.parametrize("rows", [1, 2, 8, 20])  # more than 2: oneDNN in either layout
def test_linear_splits_one_or_two_rows_across_threads_and_gives_more_to_onednn(threads, rows, monkeypatch):
    """model.linear without autograd on the CPU in float32: F.linear's products, from the thread split for one or two
    rows times a column-major weight, else from oneDNN."""
    torch.manual_seed(0)
    calls = []  # the split's batched products and oneDNN's products
    for name in ("bmm", "baddbmm"):
        monkeypatch.setattr(torch, name,
                            lambda *a, f=getattr(torch, name): calls.append(("split", a[-1].shape)) or f(*a))
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(("onednn",)) or onednn(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_features, bias in [(96, None), (96, torch.randn(96)), (100, torch.randn(100))]:
            for column_major in (True, False):
                weight = torch.randn(64, out_features).t() if column_major else torch.randn(out_features, 64)
                for x in (torch.randn(rows, 64), torch.randn(1, rows, 64)):
                    calls.clear()
                    with torch.inference_mode():
                        y = linear(x, weight, bias)
                    split = column_major and rows <= 2 and out_features % threads == 0
                    assert calls == ([("split", (threads, 64, out_features // threads))] if split else [("onednn",)])
                    # the same dot products (split: to the last bit but for a 1-row product with a bias, which the
                    # BLAS adds in another kernel; oneDNN sums in another order)
                    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        # where autograd needs the product: F.linear, with its gradients
        weight = torch.randn(96, 64, requires_grad=True)
        calls.clear()
        linear(torch.randn(rows, 64), weight).sum().backward()
        assert calls == [] and weight.grad is not None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True), dict(final_softcap=3.0, lm_head_bias=True),
                                       "lora_head"])
def test_per_token_logprobs_equal_log_softmax_gathered_with_the_same_gradients(overrides):
    """model(x, targets=y, per_token=True): each target's log-probability a chunk at a time, with the gradient of
    log_softmax(model(x)) gathered, in float64; 0 at ignored targets."""
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", block_size=150, **(overrides if isinstance(overrides, dict) else {}))
    model = GPT(config).double()
    if overrides == "lora_head":
        add_lora(model, LoRAConfig(targets=("q", "lm_head")))
        torch.nn.init.normal_(model.lm_head.lora_B, std=0.1)
    x = torch.randint(0, config.vocab_size, (2, 150))
    y = torch.randint(0, config.vocab_size, (2, 150))
    y[0, :40] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.rand(2, 150, dtype=torch.float64)  # any downstream use: a weighted sum of the log-probs

    expected = torch.log_softmax(model(x), dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    expected = expected * (y != IGNORE_INDEX)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    logprobs = model(x, targets=y, per_token=True)  # 2 x 150 - 40 = 260 kept rows: chunks of 256 and 4
    grads = torch.autograd.grad((logprobs * weights).sum(), params)
    assert logprobs.shape == (2, 150) and logprobs.dtype == torch.float64
    assert torch.equal(logprobs[0, :40], torch.zeros(40, dtype=torch.float64))
    torch.testing.assert_close(logprobs, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_router_aux_loss_is_transformers_load_balancing_loss():
    """The MoE load-balancing loss, pooled over layers as transformers' load_balancing_loss_func pools it, on the same
    router logits (captured from our routers); its gradient reaches the routers; uniform routing gives k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from model import MoE, router_aux_loss
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", mlp="moe", n_expert=4, n_expert_per_token=2, n_layer=3)
    model = GPT(config).double()
    logits = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.router.register_forward_hook(lambda mod, inp, out: logits.append(out.detach()))
    model(torch.randint(0, config.vocab_size, (3, 20)))
    aux = router_aux_loss(model)
    expected = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2)
    assert len(logits) == 3
    torch.testing.assert_close(aux, expected.to(aux.dtype), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(aux, model.layers[0].mlp.router.weight)
    assert grad.abs().sum() > 0
    model.eval()  # an eval forward records nothing new
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.routing = None
                m.router.weight.zero_()  # every expert equally likely: the balanced value, k
        model(torch.randint(0, config.vocab_size, (3, 20)))
    assert router_aux_loss(model) is None
    model.train()
    model(torch.randint(0, config.vocab_size, (3, 20)))
    torch.testing.assert_close(router_aux_loss(model).item(), 2.0)
    assert router_aux_loss(GPT(Config.from_name("tiny-test"))) is None  # a dense model has none
