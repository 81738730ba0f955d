"""pretrain.py against `litgpt pretrain`, whole scripts on the same model shape and corpus, in the same run.

    python bench/pretrain_script_vs_litgpt.py                          # fp32, 40 steps each
    python bench/pretrain_script_vs_litgpt.py --precision bf16-mixed --compile true     # on bf16 hardware

The pretraining issue's setting: a pythia-14m-shaped model (6 layers, 128 wide, 50,304-entry vocabulary), micro =
global batch 4 x 256 tokens, on 4 MB of the CPython standard library (whole .py files, copied as .txt for LitGPT's
TextFiles data module) tokenised with the default stdlib tokenizer. Ours: prepare_text.py, then pretrain.py; LitGPT:
`litgpt pretrain pythia-14m --data TextFiles` from .venv-peers (it tokenises into its own litdata chunks first).
Tokens/s, the same way for both: the wall clock between the progress lines of step steps-20 and step steps-1 as they
arrive (ours: the progress bar; LitGPT: its "iter N" lines, --train.log_interval 1), so batch fetching, logging and
everything else a script does each step is counted and the final checkpoint is not. Also shown: what each script
reports itself (ours: metrics.csv's tokens_per_sec over its last 10 steps; LitGPT: 1,024 tokens over its per-step
"iter time", which leaves out fetching the batch). LitGPT's own summary divides by the wrong count, and its
--train.max_steps is ignored, so its run is bounded with --train.max_tokens.
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
import time
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
        sys.exit(f"{TOKENIZER}: missing; python -m data_prep.prepare_stdlib trains it")
    corpus = build_corpus(WORK / "corpus")
    # unbuffered, so each progress line arrives when it is printed
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    window = (args.steps - 20, args.steps - 1)

    if not (WORK / "chunks" / "train" / "index.json").is_file():
        run([sys.executable, "-m", "data_prep.prepare_text", "--inputs", str(corpus), "--tokenizer_dir", str(TOKENIZER),
             "--out_dir", str(WORK / "chunks"), "--val_fraction", "0"], env)
    shutil.rmtree(WORK / "ours", ignore_errors=True)
    _, arrivals = run([sys.executable, "pretrain.py", "--model.name", "pythia-14m", "--model.overrides",
                       '{"block_size": 256}', "--data.train_dirs", json.dumps([str(WORK / "chunks" / "train")]),
                       "--data.val_dir", "null", "--tokenizer_dir", str(TOKENIZER), "--out_dir", str(WORK / "ours"),
                       "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps",
                       str(args.steps), "--checkpoint.interval", str(args.steps), "--precision", args.precision,
                       "--compile", args.compile], env, progress=re.compile(r"pretrain:.*?\|\s*(\d+)/\d+"))
    rows = list(csv.DictReader(open(WORK / "ours" / "metrics.csv")))
    ours = wall_tokens_per_sec(arrivals, window)
    ours_reported = float(rows[-1]["tokens_per_sec"])
    print(json.dumps({"ours tokens/s": round(ours, 1), "ours reported": round(ours_reported, 1)}), flush=True)

    peer = None
    if PEER.is_file():
        shutil.rmtree(WORK / "litgpt", ignore_errors=True)
        output, arrivals = run([str(PEER), "pretrain", "pythia-14m", "--tokenizer_dir", str(TOKENIZER), "--data",
                                "TextFiles", "--data.train_data_path", str(corpus), "--data.num_workers", "1",
                                "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
                                "--train.max_tokens", str(args.steps * TOKENS_PER_STEP), "--train.max_seq_length",
                                "256", "--train.log_interval", "1", "--train.save_interval", "100000",
                                "--eval.interval", "100000", "--eval.initial_validation", "false",
                                "--eval.final_validation", "false", "--precision", args.precision, "--out_dir",
                                str(WORK / "litgpt"), "--logger_name", "csv"],
                               env, cwd=WORK, progress=re.compile(r"iter (\d+) step"))
        times = [float(t) / 1000 for t in re.findall(r"iter time: ([\d.]+) ?ms", output)]
        peer = wall_tokens_per_sec(arrivals, window)
        peer_reported = TOKENS_PER_STEP / statistics.mean(times[-10:])
        print(json.dumps({"LitGPT tokens/s": round(peer, 1), "LitGPT reported": round(peer_reported, 1)}), flush=True)

    print(f"\npythia-14m shape, 4 x 256 tokens a step, {args.steps} steps, {args.precision}, ours compile "
          f"{args.compile}, OMP_NUM_THREADS={args.threads}")
    print(f"wall clock, steps {window[0]} to {window[1]}: ours {ours:,.0f} tokens/s"
          + (f", LitGPT {peer:,.0f} tokens/s, ours / LitGPT {ours / peer:.2f}" if peer else ", LitGPT not installed"))
    print(f"as reported by each script: ours {ours_reported:,.0f}"
          + (f", LitGPT {peer_reported:,.0f} (iter time, batch fetch left out)" if peer else ""))


def build_corpus(out: Path) -> Path:
    """Whole stdlib .py files, in their sorted order, until 4 MB, as .txt files."""
    if out.is_dir():
        return out
    from corpus import find_files
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


def run(cmd: list[str], env: dict, cwd: Path = ROOT, progress: re.Pattern | None = None) -> tuple[str, dict]:
    """Run cmd; return its output and, when progress is given, {step: arrival time} of the lines (split at \\r or
    \\n: a progress bar redraws with \\r) whose first group is a step number."""
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, arrivals, pending = [], {}, b""
    while chunk := proc.stdout.read1(65536):
        now = time.perf_counter()
        pending += chunk
        *lines, pending = re.split(rb"[\r\n]", pending)
        for line in lines:
            text = line.decode(errors="replace")
            output.append(text)
            if progress and (m := progress.search(text)):
                arrivals.setdefault(int(m.group(1)), now)
    output.append(pending.decode(errors="replace"))
    if proc.wait():
        sys.exit("failed:\n" + "\n".join(output)[-4000:])
    return "\n".join(output), arrivals


def wall_tokens_per_sec(arrivals: dict, window: tuple[int, int]) -> float:
    first, last = window
    if first not in arrivals or last not in arrivals:
        sys.exit(f"progress lines for steps {first} and {last} not seen (got {sorted(arrivals)[:5]}...)")
    return (last - first) * TOKENS_PER_STEP / (arrivals[last] - arrivals[first])


if __name__ == "__main__":
    main()
