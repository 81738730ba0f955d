"""The matmuls of one decode step on the CPU, float32: every layer's matrices of SmolLM2-135M (30 layers of q/k/v
stacked, o, gate/up stacked and down; then the tied 49,152 x 576 head), each product of `rows` rows, in the ways
model.linear can multiply them. 540 MB of weights, far more than the caches, so each step streams them from memory
as a real decode step does. Variants alternate within each round; medians over rounds (the first left out).

    python bench/decode_matmul.py --rows 1 8 32

- F.linear, row-major: what nn.Linear does (the BLAS's sgemm);
- model.linear, column-major (use_decode_layout for one or two rows): its thread split for one or two rows, oneDNN
  (torch.ops.mkldnn._linear_pointwise) for more;
- model.linear, row-major (use_decode_layout for more rows): oneDNN;
all in one arena of 2 MB pages (generation.HugePageArena), as use_decode_layout lays them out.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generation import HugePageArena  # noqa: E402
from model import linear  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): qkv, o, gate_up, down
HEAD = (49152, 576)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * 30 + [HEAD]
    arenas = {}
    for layout in ("row", "column"):
        arenas[layout] = HugePageArena(sum(n * k for n, k in shapes) * 4 + 64 * len(shapes))
    weights = {"row": [], "column": []}
    for n, k in shapes:
        w = torch.randn(n, k)
        weights["row"].append(arenas["row"].take(n * k).view(n, k).copy_(w))
        weights["column"].append(arenas["column"].take(n * k).view(k, n).t().copy_(w))
    variants = {"F.linear, row-major": (F.linear, "row"), "model.linear, column-major": (linear, "column"),
                "model.linear, row-major": (linear, "row")}
    gigabytes = sum(n * k for n, k in shapes) * 4 / 1e9
    print(f"{len(shapes)} matrices, {gigabytes * 1e3:.0f} MB float32, {args.threads} threads; ms per decode step "
          f"(median of {args.rounds - 1} rounds), effective GB/s")
    with torch.inference_mode():
        for rows in args.rows:
            xs = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (product, layout) in variants.items():
                    start = time.perf_counter()
                    for w in weights[layout]:
                        product(xs[w.shape[1]], w)
                    times[name].append(time.perf_counter() - start)
            for name, t in times.items():
                ms = statistics.median(t[1:]) * 1e3
                print(f"rows {rows:3d}  {name:26s} {ms:7.1f} ms  {gigabytes / ms * 1e3:5.1f} GB/s")


if __name__ == "__main__":
    main()
