"""pretrain.py against `litgpt pretrain`, whole scripts on the same model shape and corpus, in the same run.

    python bench/pretrain_script_vs_litgpt.py                          # fp32, 40 steps each
    python bench/pretrain_script_vs_litgpt.py --precision bf16-mixed --compile true     # on bf16 hardware

The pretraining issue's setting: a pythia-14m-shaped model (6 layers, 128 wide, 50,304-entry vocabulary), micro =
global batch 4 x 256 tokens, on 4 MB of the CPython standard library (whole .py files, copied as .txt for LitGPT's
TextFiles data module) tokenised with the default stdlib tokenizer. Ours: prepare_text.py, then pretrain.py; LitGPT:
`litgpt pretrain pythia-14m --data TextFiles` from .venv-peers (it tokenises into its own litdata chunks first).
Tokens/s: 1,024 tokens over the mean step time of the last 10 steps (ours: metrics.csv's tokens_per_sec, a window of
10 steps; LitGPT: its per-step "iter time"; its own summary divides by the wrong count, and its --train.max_steps is
ignored, so its run is bounded with --train.max_tokens). Data loading, evaluation and checkpoints excluded.
"""

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEER = ROOT / ".venv-peers" / "bin" / "litgpt"
WORK = ROOT / ".cache" / "bench-pretrain-script"
TOKENIZER = ROOT / "checkpoints" / "stdlib-tokenizer"
TOKENS_PER_STEP = 4 * 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", default="false", help="ours: torch.compile (true/false); LitGPT compiles always")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"{TOKENIZER}: missing; python data_prep/prepare_stdlib.py trains it")
    corpus = build_corpus(WORK / "corpus")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    if not (WORK / "chunks" / "train" / "index.json").is_file():
        run([sys.executable, "data_prep/prepare_text.py", "--inputs", str(corpus), "--tokenizer_dir", str(TOKENIZER),
             "--out_dir", str(WORK / "chunks"), "--val_fraction", "0"], env)
    shutil.rmtree(WORK / "ours", ignore_errors=True)
    run([sys.executable, "pretrain.py", "--model.name", "pythia-14m", "--model.overrides", '{"block_size": 256}',
         "--data.train_dirs", json.dumps([str(WORK / "chunks" / "train")]), "--data.val_dir", "null",
         "--tokenizer_dir", str(TOKENIZER), "--out_dir", str(WORK / "ours"), "--train.global_batch_size", "4",
         "--train.micro_batch_size", "4", "--train.max_steps", str(args.steps), "--checkpoint.interval",
         str(args.steps), "--precision", args.precision, "--compile", args.compile], env)
    rows = list(csv.DictReader(open(WORK / "ours" / "metrics.csv")))
    ours = float(rows[-1]["tokens_per_sec"])
    print(json.dumps({"ours tokens/s": round(ours, 1)}), flush=True)

    peer = None
    if PEER.is_file():
        shutil.rmtree(WORK / "litgpt", ignore_errors=True)
        output = run([str(PEER), "pretrain", "pythia-14m", "--tokenizer_dir", str(TOKENIZER), "--data", "TextFiles",
                      "--data.train_data_path", str(corpus), "--data.num_workers", "1",
                      "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
                      "--train.max_tokens", str(args.steps * TOKENS_PER_STEP), "--train.max_seq_length", "256",
                      "--train.log_interval", "1", "--train.save_interval", "100000", "--eval.interval", "100000",
                      "--eval.initial_validation", "false", "--eval.final_validation", "false",
                      "--precision", args.precision, "--out_dir", str(WORK / "litgpt"), "--logger_name", "csv"],
                     env, cwd=WORK)
        times = [float(t) / 1000 for t in re.findall(r"iter time: ([\d.]+) ?ms", output)]
        peer = TOKENS_PER_STEP / statistics.mean(times[-10:])
        print(json.dumps({"LitGPT tokens/s": round(peer, 1)}), flush=True)

    print(f"\npythia-14m shape, 4 x 256 tokens a step, {args.steps} steps, {args.precision}, ours compile "
          f"{args.compile}, OMP_NUM_THREADS={args.threads}")
    print(f"ours {ours:,.0f} tokens/s" + (f", LitGPT {peer:,.0f} tokens/s, ours / LitGPT {ours / peer:.2f}"
                                          if peer else ", LitGPT not installed"))


def build_corpus(out: Path) -> Path:
    """Whole stdlib .py files, in their sorted order, until 4 MB, as .txt files."""
    if out.is_dir():
        return out
    from data_prep.corpus import find_files
    from data_prep.prepare_stdlib import EXCLUDE
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for f in find_files(str(stdlib), "*.py", EXCLUDE):
        if total + f.stat().st_size <= 4_000_000:
            shutil.copy(f, tmp / ("_".join(f.relative_to(stdlib).parts) + ".txt"))
            total += f.stat().st_size
    tmp.rename(out)
    return out


def run(cmd: list[str], env: dict, cwd: Path = ROOT) -> str:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


if __name__ == "__main__":
    main()
