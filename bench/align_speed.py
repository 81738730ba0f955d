"""DPO training speed and peak memory: align.py beside TRL's DPOTrainer (PyPI `trl` in .venv-peers), the same work.

SmolLM2-135M-Instruct (the transformers directory tests/conftest.py builds in .cache/; ours converted from it), the
same 32 chat pairs rendered with its chat template, the same batch (8 pairs a step, one micro-batch), float32 (or
bf16 autocast on both sides: `--precision bf16-mixed`), beta 0.1, the reference live (a frozen copy) or precomputed once
before training. Each run is its own process; rounds alternate ours and TRL's. Reported per run: the median seconds
from one step's start to the next (the first step, a warm-up, and the last, which validates and saves, left out) and
the process's peak resident memory.

    python bench/align_speed.py                     # live and precomputed reference, 2 rounds
    python bench/align_speed.py --rounds 3 --steps 8 --modes '[live]'
    python bench/align_speed.py --precision bf16-mixed    # TRL's default precision; for a CPU with AVX512-BF16 or a GPU
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".venv-peers" / "bin" / "python"
sys.path.insert(0, str(ROOT))

from jsonargparse import CLI  # noqa: E402

QUESTIONS = ["What colour is the sky on a clear day?", "How many legs does a spider have?",
             "What is the capital of France?", "What do bees make?", "How many days are in a week?",
             "What is the opposite of hot?", "Which animal says moo?", "What is frozen water called?"]

OURS = r"""
import json, sys, time
import torch
torch.set_float32_matmul_precision("high")
from jsonargparse import CLI
import align
starts = []
lr_at = align.lr_at
def timed(step, *args):
    starts.append(time.perf_counter())
    return lr_at(step, *args)
align.lr_at = timed
CLI(align.setup, args=json.loads(sys.argv[1]), exit_on_error=False)
import resource
print("STARTS " + json.dumps(starts) + "\nPEAK " + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""

TRL = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
hf_dir, data_file, out_dir, steps, batch, precompute, bf16 = sys.argv[1:8]
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
records = [json.loads(line) for line in open(data_file)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                              "chosen": [{"role": "assistant", "content": r["chosen"]}],
                              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
starts = []
class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        starts.append(time.perf_counter())
config = DPOConfig(output_dir=out_dir, per_device_train_batch_size=int(batch), gradient_accumulation_steps=1,
                   max_steps=int(steps), learning_rate=5e-7, beta=0.1, logging_steps=1, report_to=[], use_cpu=True,
                   save_strategy="no", precompute_ref_log_probs=precompute == "true", max_length=1024,
                   dataloader_num_workers=0, seed=1337,
                   # TRL's own defaults are bf16 autocast and gradient checkpointing; here: as ours, no recompute
                   bf16=bf16 == "true", fp16=False, gradient_checkpointing=False)
trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
trainer.train()
import resource
print("STARTS " + json.dumps(starts) + "\nPEAK " + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def pairs() -> list[dict]:
    """32 pairs: each question answered in full (chosen) or curtly (rejected), 4 phrasings of the question."""
    records = []
    for i, q in enumerate(QUESTIONS):
        for j, prefix in enumerate(["", "Please tell me: ", "Quick question. ", "I wonder: "]):
            records.append({"prompt": prefix + q, "chosen": f"Here is a careful answer to '{q}' with the reasoning "
                            f"behind it, step by step, number {i * 4 + j}.", "rejected": "No idea."})
    return records


def run(command: list[str]) -> tuple[float, float]:
    """(median s/step, peak RSS GiB, which the child reports of itself) of one child process."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.splitlines()
    starts = json.loads(next(line for line in lines if line.startswith("STARTS "))[7:])
    peak_kib = int(next(line for line in lines if line.startswith("PEAK "))[5:])
    gaps = [b - a for a, b in zip(starts, starts[1:])][1:]  # from step 2's start: step 1 warms up
    return statistics.median(gaps), peak_kib / 2**20


def main(rounds: int = 2, steps: int = 6, batch: int = 8, modes: list[str] = ["live", "precomputed"],
         precision: Literal["32-true", "bf16-mixed"] = "32-true",
         hf_dir: Path = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf") -> dict:
    """Alternate ours and TRL's DPO runs and print s/step and peak memory.

    Args:
        rounds: alternating rounds per mode.
        steps: optimizer steps per run (the medians use steps 2 .. steps - 1).
        batch: pairs per step, one micro-batch.
        modes: live (a frozen reference model), precomputed (its log-probs computed once before training).
        precision: 32-true, or bf16-mixed (bf16 autocast: ours --precision bf16-mixed, TRL's bf16=True).
        hf_dir: SmolLM2-135M-Instruct as a transformers directory.
    """
    from convert import from_hf
    work = Path(tempfile.mkdtemp(prefix="align_speed_"))
    ours_dir = from_hf.convert(hf_dir, out_dir=work / "smollm2")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs()))
    results = {}
    for mode in modes:
        precompute = "true" if mode == "precomputed" else "false"
        figures = {"ours": [], "trl": []}
        for r in range(rounds):
            args = ["--checkpoint_dir", str(ours_dir), "--data.train_files", str(data), "--data.val_split", "0",
                    "--out_dir", str(work / f"ours-{mode}-{r}"), "--train.global_batch_size", str(batch),
                    "--train.micro_batch_size", str(batch), "--train.epochs", "null", "--train.max_steps", str(steps),
                    "--train.lr", "5e-7", "--train.warmup_steps", "0", "--loss.beta", "0.1", "--reference", "copy",
                    "--precompute_reference", precompute, "--eval.interval", str(steps + 1), "--eval.max_new_tokens",
                    "1", "--checkpoint.interval", str(steps + 1), "--precision", precision]
            figures["ours"].append(run([sys.executable, "-c", OURS, json.dumps(args)]))
            figures["trl"].append(run([str(PEERS), "-c", TRL, str(hf_dir), str(data), str(work / f"trl-{mode}-{r}"),
                                       str(steps), str(batch), precompute,
                                       "true" if precision == "bf16-mixed" else "false"]))
            print(mode, r, {k: v[-1] for k, v in figures.items()}, flush=True)
        ours = statistics.median(s for s, _ in figures["ours"])
        trl = statistics.median(s for s, _ in figures["trl"])
        memory = {k: max(m for _, m in v) for k, v in figures.items()}
        results[mode] = dict(ours_s_per_step=round(ours, 3), trl_s_per_step=round(trl, 3),
                             speedup=round(trl / ours, 2), ours_peak_gib=round(memory["ours"], 2),
                             trl_peak_gib=round(memory["trl"], 2), rounds=figures)
        print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "rounds"}), flush=True)
    return results


if __name__ == "__main__":
    CLI(main)
