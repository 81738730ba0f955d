"""Training throughput of our GPT beside LitGPT's on the same config, in the same run (BENCH.md).

    python bench/pretrain_throughput.py                       # fp32, ours and LitGPT
    python bench/pretrain_throughput.py --precision bf16-mixed --compile

One training step = forward + loss + backward + AdamW step on a micro batch of 4 x 512 random tokens, each
implementation's step as its own pretrain script takes it: ours `model(x, targets=y)` (the head and cross entropy
fused, a chunk of positions at a time) and AdamW as training.make_optimizer builds it (fused, on CUDA and CPU);
LitGPT `chunked_cross_entropy(model(x), y)` and a plain AdamW (its pretrain fuses it on CUDA only).
`--plain_loss` gives both the same unchunked F.cross_entropy on the logits and a plain AdamW: the models alone.
Each implementation runs in its own process (LitGPT from .venv-peers, which pins older libraries), 2 torch
threads, with warm-up steps first; the figure is the median over the timed steps. Weights are each
implementation's own random init: values do not change the speed of these fp32/bf16 kernels.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
# BENCH.md's reference: a Llama of 51.75M parameters
REFERENCE = dict(block_size=512, vocab_size=32000, n_layer=6, n_head=8, n_kv_head=8, n_embd=512,
                 intermediate_size=1376)


def build(impl: str) -> torch.nn.Module:
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from model import GPT, Config
        return GPT(Config(name="bench-51m", **REFERENCE))
    import litgpt
    c = REFERENCE
    return litgpt.model.GPT(litgpt.Config(
        block_size=c["block_size"], vocab_size=c["vocab_size"], padded_vocab_size=c["vocab_size"],
        n_layer=c["n_layer"], n_head=c["n_head"], n_query_groups=c["n_kv_head"], n_embd=c["n_embd"],
        intermediate_size=c["intermediate_size"], rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP"))


def measure(impl: str, precision: str, steps: int, warmup: int, compile: bool, batch_size: int,
            plain_loss: bool) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build(impl)
    forward = torch.compile(model) if compile else model
    if plain_loss:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_of = lambda x, y: torch.nn.functional.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten())
    elif impl == "ours":
        from training import make_optimizer
        optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), torch.device("cpu"))
        loss_of = lambda x, y: forward(x, targets=y) / y.numel()
    else:
        from litgpt.utils import chunked_cross_entropy
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
        loss_of = lambda x, y: chunked_cross_entropy(forward(x), y)
    T = REFERENCE["block_size"]
    x = torch.randint(0, REFERENCE["vocab_size"], (batch_size, T + 1))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = loss_of(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return dict(impl=impl, tokens_per_sec=batch_size * T / statistics.median(times), params=params,
                step_times=times)


def peak_flops(precision: str) -> float:
    torch.set_num_threads(2)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["ours", "litgpt"], help="measure one implementation, print JSON")
    # bf16-mixed is opt-in: CPUs without AVX512-BF16/AMX (e.g. AVX2-only EPYCs) run bf16 matmuls far slower than fp32
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], nargs="+", default=["32-true"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile ours")
    parser.add_argument("--plain_loss", action="store_true", help="both: unchunked cross entropy, plain AdamW")
    args = parser.parse_args()
    if args.impl:
        for precision in args.precision:
            result = measure(args.impl, precision, args.steps, args.warmup, args.compile and args.impl == "ours",
                             args.batch_size, args.plain_loss)
            print(json.dumps(dict(result, precision=precision)))
        return

    c = REFERENCE
    # training FLOPs per token: 6 x matmul weights (the embedding lookup excluded) + attention 12 x L x C x T
    matmul_params = c["n_layer"] * (4 * c["n_embd"] ** 2 + 3 * c["n_embd"] * c["intermediate_size"]) \
        + c["vocab_size"] * c["n_embd"]
    flops_per_token = 6 * matmul_params + 12 * c["n_layer"] * c["n_embd"] * c["block_size"]
    print(f"reference Llama config, micro batch {args.batch_size} x {c['block_size']}, AdamW, 2 threads, "
          f"{'plain cross entropy, both' if args.plain_loss else 'each with its own loss and AdamW'}, "
          f"{flops_per_token / 1e6:.0f} MFLOP/token; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'precision':<12}{'impl':<10}{'tokens/s':>10}{'MFU':>8}{'vs LitGPT':>11}")
    for precision in args.precision:
        peak = peak_flops(precision)
        rows = {}
        for impl, python in (("ours", sys.executable), ("litgpt", str(PEER_PYTHON))):
            if impl == "litgpt" and not PEER_PYTHON.is_file():
                print(f"{precision:<12}{impl:<10}  (no .venv-peers: see BENCH.md)")
                continue
            cmd = [python, __file__, "--impl", impl, "--precision", precision, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch_size", str(args.batch_size)]
            flags = (["--compile"] if args.compile else []) + (["--plain_loss"] if args.plain_loss else [])
            out = subprocess.run(cmd + flags, capture_output=True, text=True)
            if out.returncode:
                print(f"{precision:<12}{impl:<10}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        for impl, r in rows.items():
            ratio = r["tokens_per_sec"] / rows["litgpt"]["tokens_per_sec"] if "litgpt" in rows else math.nan
            print(f"{precision:<12}{impl + ('+compile' if args.compile and impl == 'ours' else ''):<10}"
                  f"{r['tokens_per_sec']:>10,.0f}{r['tokens_per_sec'] * flops_per_token / peak:>8.1%}{ratio:>10.2f}x")
        print(f"{'':<12}{'peak':<10}{peak / 1e9:>10,.0f} GFLOP/s (2048^3 matmul)")


if __name__ == "__main__":
    main()
