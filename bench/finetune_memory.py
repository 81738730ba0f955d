"""Peak memory and throughput of full finetuning, LoRA and QLoRA (nf4) on the same model and data, in one run.

    python bench/finetune_memory.py                                   # SmolLM2-135M-Instruct, CPU, fp32
    python bench/finetune_memory.py --precision bf16-true             # on a GPU
    python bench/finetune_memory.py --checkpoint_dir DIR --steps 20 --threads 2

Each mode is finetune_full.py or finetune_lora.py itself, run in its own process on the same synthetic chat data
(fixed-length records drawn with a fixed seed), so the figures are what a user's run costs. Memory: on CUDA, the
peak of torch.cuda.max_memory_allocated that the script prints; on the CPU, the process's peak resident set size
(ru_maxrss, which includes loading the float weights that QLoRA then quantises) and the largest resident set seen
while training (sampled every 0.1 s once the first step is logged: the steady state), with its anonymous part (the
rest is pages of the memory-mapped checkpoint file, which the kernel can drop). Both include the ~0.5 GB
that importing torch and lightning costs; the `imports` row measures that alone. tokens/s is the script's own
figure at its last step: input tokens (no padding) over the time of the last steps, evaluation and saving excluded.
"""

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"full": ["finetune_full.py"], "lora": ["finetune_lora.py"],
         "qlora-nf4": ["finetune_lora.py", "--quantize", "bnb.nf4"]}
WORDS = ("the model learns to answer questions about cats dogs rivers mountains numbers colours music history "
         "science cooking travel weather gardens planets oceans books games").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", default="checkpoints/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4, help="micro = global batch: no accumulation")
    parser.add_argument("--words", type=int, default=100, help="words per reply (prompt: 12)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="finetune_memory-"))
    rng = random.Random(0)
    records = [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=12)) + "?"},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=args.words)) + "."}]}
               for _ in range(args.batch_size * args.steps)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    results = {"imports": measure([sys.executable, "-c", "import finetune_lora, quantize"], env, work / "none")}
    for mode in args.modes:
        script, *extra = MODES[mode]
        out = work / mode
        cmd = [sys.executable, script, "--checkpoint_dir", args.checkpoint_dir, "--data.train_files",
               str(work / "data.jsonl"), "--data.val_split", "0", "--out_dir", str(out), "--precision", args.precision,
               "--train.global_batch_size", str(args.batch_size), "--train.micro_batch_size", str(args.batch_size),
               "--train.epochs", "null", "--train.max_steps", str(args.steps), "--train.warmup_steps", "2",
               "--eval.interval", str(args.steps), "--eval.max_new_tokens", "1", "--eval.prompt", "hi",
               "--checkpoint.interval", str(args.steps), "--lora.targets", "[q,k,v,o,gate,up,down]", *extra]
        if script == "finetune_full.py":
            cmd = [a for a in cmd if a not in ("--lora.targets", "[q,k,v,o,gate,up,down]")]
        results[mode] = measure(cmd, env, out)
        print(json.dumps({mode: results[mode]}), flush=True)

    print(f"\n{args.checkpoint_dir}, {args.precision}, {args.steps} steps of {args.batch_size} x ~{args.words + 40} "
          f"tokens, OMP_NUM_THREADS={args.threads}")
    print("| mode | peak RSS (MB) | training RSS (MB) | of which anonymous | peak CUDA (GiB) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['peak_rss_mb']:.0f} | {fmt(r['training_rss_mb'])} | {fmt(r['training_anon_mb'])} | "
              f"{fmt(r['cuda_gib'], 2)} | {fmt(r['tokens_per_sec'], 1)} |")
    if "qlora-nf4" in results and "lora" in results:
        q, lo, base = results["qlora-nf4"], results["lora"], results["imports"]["peak_rss_mb"]
        print(f"\nQLoRA / LoRA: peak RSS {ratio(q['peak_rss_mb'], lo['peak_rss_mb'], 0)} "
              f"(above the imports {ratio(q['peak_rss_mb'], lo['peak_rss_mb'], base)}), training RSS "
              f"{ratio(q['training_rss_mb'], lo['training_rss_mb'], 0)} "
              f"(above the imports {ratio(q['training_rss_mb'], lo['training_rss_mb'], base)}), anonymous "
              f"{ratio(q['training_anon_mb'], lo['training_anon_mb'], 0)}, peak CUDA "
              f"{ratio(q['cuda_gib'], lo['cuda_gib'], 0)}")


def measure(cmd: list[str], env: dict, out: Path) -> dict:
    """Run cmd; its peak RSS (wait4's rusage of that child alone), the largest RSS sampled once training has logged
    a step, the peak CUDA memory it prints and its last tokens/s."""
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would block the child
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    training_rss = training_anon = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # rusage of this child only, once it has exited
        if pid:
            break
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) > 1:
            rss, anon = rss_kb(process.pid)
            training_rss, training_anon = max(training_rss, rss), max(training_anon, anon)
        time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    output = log.read_text()
    if process.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    rows = list(csv.DictReader(open(out / "metrics.csv"))) if (out / "metrics.csv").is_file() else []
    cuda = re.search(r"peak CUDA memory: ([\d.]+) GiB", output)
    return dict(peak_rss_mb=usage.ru_maxrss / 1024, training_rss_mb=training_rss / 1024 or None,
                training_anon_mb=training_anon / 1024 or None,
                cuda_gib=float(cuda[1]) if cuda else None,
                tokens_per_sec=float(rows[-1]["tokens_per_sec"]) if rows else None,
                seconds=round(time.perf_counter() - start, 1))


def rss_kb(pid: int) -> tuple[int, int]:
    """Resident set size and its anonymous part: the rest is file pages (memory-mapped safetensors) that the
    kernel can drop under pressure."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    rss, anon = re.search(r"VmRSS:\s+(\d+)", status), re.search(r"RssAnon:\s+(\d+)", status)
    return (int(rss[1]), int(anon[1])) if rss and anon else (0, 0)  # none: exited, not yet reaped


def fmt(x, digits: int = 0) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def ratio(a, b, minus: float) -> str:
    return "-" if not a or not b else f"{(a - minus) / (b - minus):.2f}"


if __name__ == "__main__":
    main()
