"""The optimizer step of bf16-true training: training.CompensatedAdamW beside torch's fused AdamW, on the parameters
of a real model (random values, the real shapes), alternating rounds.

    python bench/bf16_optimizer.py                      # SmolLM2-135M-Instruct's shapes
    python bench/bf16_optimizer.py --model tiny-test --rounds 5

Prints seconds per step: fused AdamW on float32 weights (what 32-true and bf16-mixed run), fused AdamW on bf16 weights
(the update that loses small steps), CompensatedAdamW on bf16 weights (what bf16-true runs now).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, Config  # noqa: E402
from training import CompensatedAdamW  # noqa: E402


def make(kind: str, model_name: str):
    torch.manual_seed(0)
    dtype = torch.float32 if kind == "fused fp32" else torch.bfloat16
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(Config.from_name(model_name)).parameters()]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if kind == "compensated bf16":
        return CompensatedAdamW(params, lr=2e-5, betas=(0.9, 0.95))
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), fused=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    kinds = ["fused fp32", "fused bf16", "compensated bf16"]
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:  # alternating: a noisy machine slows all of them alike
            optimizer = make(kind, args.model)
            optimizer.step()  # state allocated outside the timing
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[kind].append((time.perf_counter() - start) / args.steps)
            del optimizer
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads: s per optimizer step "
          f"(median of {args.rounds} rounds of {args.steps})")
    for kind in kinds:
        print(f"  {kind:18s} {statistics.median(times[kind]):.3f}")


if __name__ == "__main__":
    main()
