"""Packed against padded finetuning: time per epoch and examples/s of finetune_full.py on SmolLM2-135M-Instruct, with
`--data.packing false` and `true`, on records whose lengths are shaped like Alpaca's, alternating runs in one session.

    python bench/packing_speed.py                   # 2 rounds of each, fp32, 2 threads
    python bench/packing_speed.py --rounds 3 --examples 128

The data: Alpaca-format records made here with a fixed seed. Word counts are lognormal, as Alpaca's are: instruction
median 12 words, an input on 40% of records (median 25), output median 45 words with a long tail (sigma 1.0, at most
400), so a micro-batch padded to its longest example holds much padding. Both runs see the same examples in the same
steps (the same seed; packing happens inside each step), so their losses must agree to float tolerance, which this
script also checks: the validation loss after one epoch, packed against padded.
Time per epoch = the epoch's training tokens / the run's tokens/s (metrics.csv; over the last 10 steps, which is every
step of these runs; validation, sampling and checkpoints excluded).
Our checkpoint of the model is converted once from the transformers copy that the tests make in .cache/.
"""

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HF_DIR = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf"
CHECKPOINT = ROOT / ".cache" / "SmolLM2-135M-Instruct"
WORDS = ("the model learns to answer questions about cats dogs rivers mountains numbers colours music history "
         "science cooking travel weather gardens planets oceans books games and of in with for").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=96, help="training records (one epoch)")
    parser.add_argument("--global_batch_size", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    if not (CHECKPOINT / "model.safetensors").is_file():
        run([sys.executable, "-m", "convert.from_hf", str(HF_DIR), "--out_dir", str(CHECKPOINT)], os.environ)
    work = Path(tempfile.mkdtemp(prefix="packing_speed-"))
    rng = random.Random(0)
    (work / "train.json").write_text(json.dumps([record(rng) for _ in range(args.examples)]))
    (work / "val.json").write_text(json.dumps([record(rng) for _ in range(32)]))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = {"padded": [], "packed": []}
    for r in range(args.rounds):
        for mode in results:  # alternating, so that a slow spell of this shared machine hits both
            results[mode].append(finetune(mode, args, work / f"{mode}-{r}", work, env))
            seconds, tokens, val = results[mode][-1]
            print(f"round {r + 1} {mode}: {seconds:.1f} s/epoch, {args.examples / seconds:.3f} examples/s, "
                  f"{tokens:,} tokens, val loss {val:.5f}", flush=True)

    padded, packed = (statistics.median(s for s, _, _ in results[m]) for m in ("padded", "packed"))
    val_gap = max(abs(a[2] - b[2]) for a, b in zip(results["padded"], results["packed"]))
    print(f"\n| run | s/epoch (median of {args.rounds}) | examples/s | val loss after the epoch |")
    print("|---|---|---|---|")
    for mode, seconds in (("padded", padded), ("packed", packed)):
        print(f"| {mode} | {seconds:.1f} | {args.examples / seconds:.3f} | {results[mode][0][2]:.5f} |")
    print(f"\npacked is {padded / packed:.2f}x faster per epoch; val loss differs by at most {val_gap:.2e}")


def record(rng: random.Random) -> dict:
    def words(median: float, sigma: float, most: int) -> str:
        n = min(max(1, round(rng.lognormvariate(0, sigma) * median)), most)
        return " ".join(rng.choices(WORDS, k=n))
    return {"instruction": words(12, 0.5, 60) + "?", "input": words(25, 0.8, 200) if rng.random() < 0.4 else "",
            "output": words(45, 1.0, 400) + "."}


def finetune(mode: str, args, out: Path, work: Path, env: dict) -> tuple[float, int, float]:
    """(seconds of training for the epoch, its tokens, the validation loss after it)."""
    steps = args.examples // args.global_batch_size
    run([sys.executable, "finetune_full.py", "--checkpoint_dir", str(CHECKPOINT),
         "--data.train_files", str(work / "train.json"), "--data.val_files", str(work / "val.json"),
         "--data.prompt_style", "alpaca", "--data.max_seq_length", str(args.max_seq_length),
         "--data.packing", str(mode == "packed").lower(), "--out_dir", str(out),
         "--train.global_batch_size", str(args.global_batch_size), "--train.micro_batch_size",
         str(args.micro_batch_size), "--train.epochs", "1", "--train.warmup_steps", "1",
         "--eval.interval", str(steps), "--eval.max_new_tokens", "1", "--eval.prompt", "hi",
         "--checkpoint.interval", str(steps)], env)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == steps <= 10, "tokens_per_sec covers the last 10 steps: keep an epoch within them"
    tokens = int(rows[-1]["tokens"])
    return tokens / float(rows[-1]["tokens_per_sec"]), tokens, float(rows[-1]["val_loss"])


def run(cmd: list[str], env: dict) -> None:
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    main()
