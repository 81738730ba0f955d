"""Seconds per optimizer step of LoRA and full finetuning: ours beside LitGPT's, same model, data and run.

    python bench/finetune_speed.py                          # SmolLM2-135M-Instruct, fp32, LoRA then full
    python bench/finetune_speed.py --modes lora --steps 16

The finetuning issue's setting: SmolLM2-135M-Instruct, Alpaca records (instruction + output, no input), micro =
global batch 4, LoRA r 8 on the query and value projections (alpha 16, dropout 0.05), fp32, 2 threads. Every record
has the same length (words drawn with a fixed seed), so every step holds the same number of tokens in both
implementations whatever order they shuffle the records in. Ours is finetune_lora.py / finetune_full.py, LitGPT's
is `litgpt finetune_lora` / `litgpt finetune_full` from .venv-peers, each in its own process, one after the other.
s/step: the mean over the last `--window` steps, evaluation and checkpointing excluded (ours: its tokens/s over the
last 10 steps, from metrics.csv; LitGPT: its printed per-iteration time, one iteration = one step here).
LitGPT needs its own checkpoint: the transformers copy of the model is converted once into .cache/bench-finetune.
"""

import argparse
import csv
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".venv-peers" / "bin" / "litgpt"
HF_DIR = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf"
LITGPT_DIR = ROOT / ".cache" / "bench-finetune" / "SmolLM2-135M-Instruct"
WORDS = ("the model learns to answer questions about cats dogs rivers mountains numbers colours music history "
         "science cooking travel weather gardens planets oceans books games").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", default="checkpoints/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--window", type=int, default=10, help="steps averaged at the end of each run")
    parser.add_argument("--words", type=int, default=36, help="words per reply (instruction: 12)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["lora", "full"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="finetune_speed-"))
    rng = random.Random(0)
    records = [{"instruction": " ".join(rng.choices(WORDS, k=12)) + "?", "input": "",
                "output": " ".join(rng.choices(WORDS, k=args.words)) + "."} for _ in range(64)]
    (work / "alpaca.json").write_text(json.dumps(records))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    peer = PEER.is_file() and litgpt_checkpoint()

    results = {}
    for mode in args.modes:
        results[mode, "ours"] = ours(mode, args, work, env)
        print(json.dumps({f"{mode} ours": results[mode, "ours"]}), flush=True)
        if peer:
            results[mode, "LitGPT"] = litgpt(mode, args, work, env)
            print(json.dumps({f"{mode} LitGPT": results[mode, "LitGPT"]}), flush=True)
    shutil.rmtree(work)

    print(f"\nSmolLM2-135M-Instruct, fp32, micro = global batch 4, {args.steps} steps, mean s/step of the last "
          f"{args.window}, OMP_NUM_THREADS={args.threads}")
    print("| mode | ours s/step | LitGPT s/step | LitGPT / ours |")
    print("|---|---|---|---|")
    for mode in args.modes:
        o, p = results[mode, "ours"], results.get((mode, "LitGPT"))
        print(f"| {mode} | {o:.3f} | {p:.3f} | {p / o:.2f} |" if p else f"| {mode} | {o:.3f} | - | - |")


def ours(mode: str, args, work: Path, env: dict) -> float:
    out = work / f"ours-{mode}"
    cmd = [sys.executable, "finetune_lora.py" if mode == "lora" else "finetune_full.py", "--checkpoint_dir",
           args.checkpoint_dir, "--data.train_files", str(work / "alpaca.json"), "--data.val_split", "0",
           "--data.prompt_style", "alpaca",  # LitGPT's JSON data renders the Alpaca prompt too
           "--out_dir", str(out), "--precision", "32-true", "--train.global_batch_size", "4",
           "--train.micro_batch_size", "4", "--train.epochs", "null", "--train.max_steps", str(args.steps),
           "--train.warmup_steps", "2", "--eval.interval", str(args.steps), "--eval.max_new_tokens", "1",
           "--eval.prompt", "hi", "--checkpoint.interval", str(args.steps)]
    if mode == "lora":
        cmd += ["--lora.targets", "[q,v]", "--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.05"]
    run(cmd, env)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    tokens_per_step = int(rows[-1]["tokens"]) - int(rows[-2]["tokens"])
    return tokens_per_step / float(rows[-1]["tokens_per_sec"])  # tokens/s is over the last 10 steps


def litgpt(mode: str, args, work: Path, env: dict) -> float:
    cmd = [str(PEER), "finetune_lora" if mode == "lora" else "finetune_full", str(LITGPT_DIR), "--data", "JSON",
           "--data.json_path", str(work / "alpaca.json"), "--data.val_split_fraction", "0.05",
           "--out_dir", str(work / f"litgpt-{mode}"), "--precision", "32-true", "--devices", "1",
           "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps", str(args.steps),
           "--train.lr_warmup_steps", "2", "--train.save_interval", "1000", "--train.log_interval", "1",
           "--eval.interval", "1000", "--eval.initial_validation", "false", "--eval.final_validation", "false",
           "--logger_name", "csv"]
    if mode == "lora":
        cmd += ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_query", "true",
                "--lora_key", "false", "--lora_value", "true", "--lora_projection", "false", "--lora_mlp", "false",
                "--lora_head", "false"]
    output = run(cmd, env)
    times = [float(t) / 1000 for t in re.findall(r"iter time: ([\d.]+) ?ms", output)]
    if len(times) < args.window:
        sys.exit(f"LitGPT printed {len(times)} iteration times:\n{output[-3000:]}")
    return statistics.mean(times[-args.window:])


def litgpt_checkpoint() -> bool:
    if not (LITGPT_DIR / "lit_model.pth").is_file():
        if not HF_DIR.is_dir():
            print(f"{HF_DIR}: not found (pytest -m real_model builds it); LitGPT skipped")
            return False
        shutil.copytree(HF_DIR, LITGPT_DIR, dirs_exist_ok=True)
        run([str(PEER), "convert_to_litgpt", str(LITGPT_DIR), "--model_name", "SmolLM2-135M-Instruct"], os.environ)
    return True


def run(cmd: list[str], env: dict) -> str:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


if __name__ == "__main__":
    main()
