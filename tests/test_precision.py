"""Training outside float32 learns what float32 learns: CompensatedAdamW for bf16 / fp16 weights, float32 adapters
under every precision (LoRA, DoRA, QLoRA), and the scripts' wiring of both."""

import lightning as L
import pytest
import torch

from model import Config, GPT, IGNORE_INDEX, InputError, LoRAConfig, add_lora, is_lora_key
from checkpoint import weights_dtype
from training import CompensatedAdamW, make_optimizer, precision_args

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# The stale-weights regime: Adam moves each weight by about lr per step on a repeated batch, 2e-5 here, while half a
# bf16 rounding step of a weight of tiny-test's init scale (0.02) is 6e-5, and of a LoRA A entry (kaiming, ~0.06)
# or a DoRA magnitude (~0.16) more: one step alone rounds away, twenty add up to several rounding steps.
LR, STEPS = 2e-5, 20


def test_compensated_adamw_on_float32_weights_is_torch_adamw(monkeypatch):
    """On float32 weights the compensation stays zero and the update is AdamW's arithmetic, slice by slice."""
    monkeypatch.setattr(CompensatedAdamW, "SLICE", {"cpu": 500})  # 1200 values: slices of 500, 500 and 200
    torch.manual_seed(0)
    shapes = [(40, 30), (30,), (20, 10)]
    ours = [torch.randn(*s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours = CompensatedAdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for step in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt_ours.step(), opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert torch.equal(opt_ours.state[p]["compensation"], torch.zeros(p.shape))


def test_compensated_adamw_on_bf16_weights_follows_float32():
    """Twenty steps at a small lr: plain AdamW on bf16 weights leaves most of them where they were (the updates round
    away); the compensated one moves them as float32 does, to within a bf16 rounding step."""
    torch.manual_seed(0)
    start = (torch.randn(256, 64) * 0.02).bfloat16().float()  # a start that bf16 holds exactly
    sign = torch.randn(256, 64).sign()  # each weight's gradient keeps its sign, as on a repeated batch
    grads = [sign * (1 + torch.rand(256, 64)) for _ in range(STEPS)]

    def run(dtype, optimizer):
        w = start.to(dtype, copy=True).requires_grad_()
        opt = optimizer([w], lr=LR, betas=(0.9, 0.95))
        for g in grads:
            w.grad = g.to(dtype)
            opt.step()
        return w.detach().float()

    fp32 = run(torch.float32, torch.optim.AdamW)
    plain = run(torch.bfloat16, torch.optim.AdamW)
    compensated = run(torch.bfloat16, CompensatedAdamW)
    start_bf16 = start.bfloat16().float()
    moved = lambda w: (w != start_bf16).float().mean().item()  # noqa: E731
    assert (fp32 != start).float().mean() == 1.0
    assert moved(plain) < 0.5  # the problem is real at this lr: most weights never move
    assert moved(compensated) > 0.95
    # where they went: each is float32's weight to within 1.5 bf16 rounding steps (8 significant bits; half a step
    # of the starting draw in the rounding cell, rounding_dither, and one of rounding), plus 2% of the distance
    # travelled (the gradients were rounded to bf16, which shifts Adam's update a little)
    step = 2.0 ** (torch.floor(torch.log2(torch.maximum(fp32.abs(), start.abs()))) - 7)
    assert ((compensated - fp32).abs() <= 1.5 * step + 0.02 * (fp32 - start).abs()).all()
    assert (plain - fp32).abs().mean() > 4 * (compensated - fp32).abs().mean()


def share_moved_after_training(precision: str, mode: str) -> tuple[float, dict[str, torch.dtype]]:
    """The share of trainable values that changed after STEPS optimizer steps on one repeated batch, as a training
    script sets it up (weights loaded in weights_dtype, Fabric with precision_args, make_optimizer); and the trainable
    parameters' dtypes after Fabric's setup."""
    torch.manual_seed(0)
    config = Config.from_name("tiny-test")
    model = GPT(config).to(weights_dtype(precision))
    if mode == "qlora":
        from quantize import quantize_model
        quantize_model(model, "bnb.nf4")
    if mode != "full":
        add_lora(model, LoRAConfig(r=4, targets=ALL_TARGETS, use_dora=mode in ("dora", "qlora")))
    fabric = L.Fabric(accelerator="cpu", devices=1, **precision_args(precision))
    module = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(module.module, LR, 0.0, (0.9, 0.95), fabric.device))
    trainable = {n: p for n, p in module.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    x = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    y[:, :8] = IGNORE_INDEX
    for _ in range(STEPS):
        fabric.backward(module(x, targets=y) / (y != IGNORE_INDEX).sum())
        optimizer.step()
        optimizer.zero_grad()
    # lora_B starts at 0, so any update moves it whatever the precision: the share is taken over the rest
    counted = [n for n in trainable if "lora_B" not in n]
    changed = sum((trainable[n] != before[n]).sum().item() for n in counted)
    total = sum(trainable[n].numel() for n in counted)
    return changed / total, {n: p.dtype for n, p in trainable.items()}


@pytest.mark.parametrize("mode", ["full", "lora", "dora", "qlora"])
def test_low_precision_training_moves_the_weights_float32_moves(mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    reference, _ = share_moved_after_training("32-true", mode)
    assert reference > 0.9
    for precision in ("bf16-mixed", "bf16-true"):
        share, dtypes = share_moved_after_training(precision, mode)
        assert share >= reference - 0.05, (precision, share, reference)
        if mode != "full":  # adapters train in float32 under every precision, as PEFT's do
            assert all(dtypes[n] == torch.float32 for n in dtypes if is_lora_key(n)), dtypes
        elif precision == "bf16-true":
            assert set(dtypes.values()) == {torch.bfloat16}  # and the weights themselves stay half precision


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(InputError, match="--precision 'bf17-true': expected one of 32-true"):
        precision_args("bf17-true")


def test_cpu_peak_flops_is_not_lowered_by_a_busy_start(monkeypatch):
    """A matmul timed while the cores are busy measures too little; the nominal cores x clock x FLOPs per cycle is the
    floor, so MFU against the peak stays a fraction."""
    import time

    import training
    quiet, how = training.device_peak_flops(torch.device("cpu"), "32-true")
    nominal, _ = training.cpu_nominal_flops(half=False)
    assert quiet >= nominal > 0 and "nominal" in how
    clock = iter(float(i) for i in range(100))  # every timed matmul takes "1 s": ~17 GFLOP/s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    busy, how = training.device_peak_flops(torch.device("cpu"), "32-true")
    assert busy == nominal
    # a matmul that slow is measured at 512^3 only: bf16 without AVX512-BF16 once spent minutes on six 2048^3 ones
    assert "a 512^3 matmul" in how


@pytest.mark.parametrize("name, precision, matmul_precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", "high", 989e12),
    ("NVIDIA H100 80GB HBM3", "32-true", "high", 495e12),  # fp32 matmuls at the TF32 rate
    ("NVIDIA H100 80GB HBM3", "32-true", "highest", 67e12),  # TF32 off: the plain fp32 rate
    ("NVIDIA H100 PCIe", "bf16-true", "high", 756e12),
    ("NVIDIA H100 NVL", "bf16-mixed", "high", 835e12),  # not the SXM figure its "H100" would match
    ("NVIDIA A100-SXM4-80GB", "bf16-mixed", "high", 312e12),
    ("NVIDIA H200", "bf16-true", "high", 989e12),
    ("Some Future GPU", "bf16-true", "high", None),
])
def test_gpu_peak_flops_follow_the_data_sheet(monkeypatch, name, precision, matmul_precision, expected):
    import training
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        peak, how = training.device_peak_flops(torch.device("cuda"), precision)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert peak == expected, how


def test_a_non_finite_gradient_under_a_finite_loss_is_a_one_line_error(tmp_path):
    from training import clip_gradients
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(torch.nn.Linear(3, 3))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.backward(model(torch.ones(2, 3)).sum())  # a finite loss
    clip_gradients(fabric, model, optimizer, 1.0, 6, tmp_path)  # finite gradients: clipped, no error
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(InputError, match=f"gradient norm is inf at step 7 .* {tmp_path} is kept") as e:
        clip_gradients(fabric, model, optimizer, 1.0, 7, tmp_path)
    assert "\n" not in str(e.value)
