"""GRPO step time, rollout and update apart: grpo.py beside TRL's GRPOTrainer (PyPI `trl` in .venv-peers, no vLLM).

SmolLM2-135M-Instruct (ours: .cache/SmolLM2-135M-Instruct; TRL: the transformers copy tests/conftest.py builds in
.cache/SmolLM2-135M-Instruct-hf), the same arithmetic prompts (data_prep/arithmetic.py, chat-rendered by each side with
the model's template), the same reward (1 when the completion's last number equals the record's answer:
rewards.final_number for ours, the same rule written out in TRL's child), P prompts x G completions a step, sampling at
temperature 1 up to L new tokens, float32 (or bf16 autocast on both sides with `--precision bf16-mixed`: TRL's
bf16=True, its default), one policy update per rollout (TRL: num_iterations 1, beta 0, loss "dapo", no gradient
checkpointing), the same torch threads. Each run is its own process; rounds alternate ours and TRL's.

    python bench/grpo_speed.py                                  # P 2, G 4, L 64, 3 measured steps, 2 rounds
    python bench/grpo_speed.py --prompts 4 --generations 8 --max_new_tokens 128 --rounds 3
    python bench/grpo_speed.py --sides '[trl]'                  # one side only

Per step, the first of every run left out (a warm-up): rollout s = sampling the completions and scoring them (ours: the
`rollout_s` of metrics.csv; TRL: a timer around GRPOTrainer._generate_and_score_completions), update s = the step's
forward, backward and optimizer step (ours: `update_s`; TRL: the optimizer step's wall time from on_step_begin to
on_step_end less its rollout). Completion lengths are sampled, so they differ between steps and sides: the table has
per-token rates beside the times, completion tokens (the eos included where one was sampled) / rollout s and / update s,
and the rollout's seconds per decode step (a batch decodes until its longest completion ends: rollout s / that length).
Figures are medians over every measured step of every round of a side.
"""

import atexit
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".venv-peers" / "bin" / "python"
sys.path.insert(0, str(ROOT))

from jsonargparse import CLI  # noqa: E402

TRL = r"""
import json, re, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
hf_dir, data_file, out_dir, steps, prompts, generations, max_new_tokens, micro, threads, lr, bf16 = sys.argv[1:12]
steps, prompts, generations, micro, threads = int(steps), int(prompts), int(generations), int(micro), int(threads)
torch.set_num_threads(threads)
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
records = [json.loads(line) for line in open(data_file)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                             for r in records])
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
def last_number(text):
    numbers = NUMBER.findall(text)
    try:
        return float(numbers[-1].replace(",", "")) if numbers else None
    except ValueError:
        return None
rewards, samples = [], []
def final_number(prompts, completions, completion_ids, answer, **kwargs):  # rewards.final_number's rule
    out = []
    for completion, expected in zip(completions, answer):
        text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        got, target = last_number(text), last_number(str(expected))
        out.append(1.0 if got is not None and target is not None and abs(got - target) < 1e-9 else 0.0)
    rewards.append(sum(out) / len(out))
    samples.append(text)
    return out
# per-device batch = completions per micro-batch; P x G completions = one generation batch = one optimizer step
accumulation = prompts * generations // micro
config = GRPOConfig(output_dir=out_dir, num_generations=generations, max_completion_length=int(max_new_tokens),
                    temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", num_iterations=1,
                    per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                    max_steps=steps, learning_rate=float(lr), bf16=bf16 == "true", fp16=False,
                    gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none", save_strategy="no",
                    eval_strategy="no", dataloader_num_workers=0, seed=1337)
assert config.generation_batch_size == prompts * generations and config.steps_per_generation == accumulation
trainer = GRPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      reward_funcs=[final_number])
rollouts, generates, tokens, longest, steps_s = [], [], [], [], []
score = trainer._generate_and_score_completions
def timed_score(*args, **kwargs):
    start = time.perf_counter()
    out = score(*args, **kwargs)
    rollouts.append(time.perf_counter() - start)
    return out
trainer._generate_and_score_completions = timed_score
generate = trainer._generate
def timed_generate(*args, **kwargs):
    start = time.perf_counter()
    out = generate(*args, **kwargs)
    generates.append(time.perf_counter() - start)
    tokens.append(sum(len(ids) for ids in out[1]))  # completion_ids, cut after the first eos
    longest.append(max(len(ids) for ids in out[1]))
    return out
trainer._generate = timed_generate
class StepTimer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kwargs):
        steps_s.append(time.perf_counter() - self.start)
trainer.add_callback(StepTimer())
trainer.train()
assert len(rollouts) == len(steps_s) == steps, (len(rollouts), len(steps_s))
print("STEPS " + json.dumps([dict(rollout_s=r, update_s=s - r, generate_s=g, tokens=t, longest=m, reward=w, sample=x)
                             for r, s, g, t, m, w, x in zip(rollouts, steps_s, generates, tokens, longest, rewards,
                                                            samples)]))
"""


def run(command: list[str], env: dict, timeout: float) -> str:
    print("+", " ".join(command if command[1] != "-c" else [command[0], "-c", "TRL", *command[3:]]), flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{command[:2]} ran past {timeout:.0f} s")
    if result.returncode != 0:
        raise SystemExit(f"{command[:2]} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-4000:]}")
    return result.stdout


def ours(args: list[str], out_dir: Path, n_sequences: int, env: dict, timeout: float) -> list[dict]:
    """Every step of one grpo.py run, from its metrics.csv."""
    run([sys.executable, "grpo.py", *args, "--out_dir", str(out_dir)], env, timeout)
    rows = [r for r in csv.DictReader(open(out_dir / "metrics.csv")) if r.get("rollout_s") and r.get("update_s")]
    shutil.rmtree(out_dir)  # its final checkpoint and optimizer state: about 2 GB
    if "step" in (rows[0] if rows else {}):
        rows.sort(key=lambda r: int(float(r["step"])))
    return [dict(rollout_s=float(r["rollout_s"]), update_s=float(r["update_s"]),
                 tokens=float(r["completions/mean_length"]) * n_sequences, longest=float(r["completions/max_length"]),
                 reward=float(r.get("reward") or "nan"))
            for r in rows]


def trl(args: list[str], env: dict, timeout: float) -> list[dict]:
    """Every step of one GRPOTrainer run, as its child prints them."""
    stdout = run([str(PEERS), "-c", TRL, *args], env, timeout)
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("STEPS "))[6:])


def summary(steps: list[dict]) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return dict(rollout_s=med([s["rollout_s"] for s in steps]), update_s=med([s["update_s"] for s in steps]),
                step_s=med([s["rollout_s"] + s["update_s"] for s in steps]),
                tokens=med([s["tokens"] for s in steps]),
                rollout_tok_s=med([s["tokens"] / s["rollout_s"] for s in steps]),
                update_tok_s=med([s["tokens"] / s["update_s"] for s in steps]),
                longest=med([s["longest"] for s in steps]),
                decode_step_ms=med([1000 * s["rollout_s"] / s["longest"] for s in steps]),
                reward=statistics.mean(s["reward"] for s in steps), n=len(steps))


def main(rounds: int = 2, steps: int = 3, prompts: int = 2, generations: int = 4, max_new_tokens: int = 64,
         micro_batch_size: int | None = None, threads: int = 2, lr: float = 1e-6, sides: list[str] = ["ours", "trl"],
         precision: Literal["32-true", "bf16-mixed"] = "32-true",
         checkpoint_dir: Path = ROOT / ".cache" / "SmolLM2-135M-Instruct",
         hf_dir: Path = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf", timeout: float = 900) -> dict:
    """Alternate grpo.py and TRL GRPOTrainer runs and print median rollout and update seconds per step.

    Args:
        rounds: alternating rounds (one run of each side a round).
        steps: measured optimizer steps per run (each run makes one more, a warm-up, left out).
        prompts: prompts per step (P).
        generations: completions per prompt (G).
        max_new_tokens: the most tokens a completion may have (L).
        micro_batch_size: completions per forward/backward (default: all P x G at once).
        threads: torch threads (OMP_NUM_THREADS) of every run.
        lr: the learning rate of both sides.
        sides: which implementations to run: ours, trl.
        precision: 32-true, or bf16-mixed (bf16 autocast: ours --precision bf16-mixed, TRL's bf16=True).
        checkpoint_dir: SmolLM2-135M-Instruct as our checkpoint.
        hf_dir: the same model as a transformers directory (TRL's).
        timeout: seconds one run may take.
    """
    from data_prep import arithmetic
    micro = micro_batch_size or prompts * generations
    if (prompts * generations) % micro or generations < 2:
        raise SystemExit(f"--micro_batch_size {micro} must divide prompts x generations ({prompts * generations}), "
                         "and --generations must be at least 2")
    total = steps + 1  # + the warm-up step
    work = Path(tempfile.mkdtemp(prefix="grpo_speed_"))
    atexit.register(shutil.rmtree, work, True)  # also when a run fails: grpo.py leaves ~2 GB of checkpoints
    arithmetic.main(out_dir=work / "data", n_train=max(200, prompts * total), n_val=0, seed=1337)
    train = work / "data" / "train.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    ours_args = ["--checkpoint_dir", str(checkpoint_dir), "--data.train_files", str(train), "--data.val_split", "0",
                 "--rewards", "[rewards:final_number]", "--rollout.num_generations", str(generations),
                 "--rollout.max_new_tokens", str(max_new_tokens), "--rollout.temperature", "1.0",
                 "--train.prompts_per_step", str(prompts), "--train.micro_batch_size", str(micro),
                 "--train.epochs", "null", "--train.max_steps", str(total), "--train.lr", str(lr),
                 "--precision", precision, "--eval.interval", "1000", "--checkpoint.interval", "1000",
                 "--logger", "csv"]
    measured = {side: [] for side in sides}
    start = time.perf_counter()
    for r in range(rounds):
        for side in sides:
            if side == "ours":
                all_steps = ours(ours_args, work / f"ours-{r}", prompts * generations, env, timeout)
            elif side == "trl":
                all_steps = trl([str(hf_dir), str(train), str(work / f"trl-{r}"), str(total), str(prompts),
                                 str(generations), str(max_new_tokens), str(micro), str(threads), str(lr),
                                 "true" if precision == "bf16-mixed" else "false"], env,
                                timeout)
            else:
                raise SystemExit(f"--sides: unknown side {side!r} (ours, trl)")
            if len(all_steps) != total:
                raise SystemExit(f"{side}: {len(all_steps)} steps logged, expected {total}")
            measured[side] += all_steps[1:]
            print(f"round {r} {side} steps: " + json.dumps([{k: round(v, 2) if isinstance(v, float) else v
                                                             for k, v in x.items() if k != "sample"}
                                                            for x in all_steps]), flush=True)
            if r == 0 and all_steps[-1].get("sample") is not None:
                print(f"{side}, a completion of the last step: {all_steps[-1]['sample']!r}", flush=True)
            s = summary(all_steps[1:])
            print(f"round {r} {side}: rollout {s['rollout_s']:.2f} s, update {s['update_s']:.2f} s, "
                  f"{s['tokens']:.0f} completion tokens/step, reward {s['reward']:.2f}; warm-up step "
                  f"{all_steps[0]['rollout_s']:.2f} + {all_steps[0]['update_s']:.2f} s", flush=True)
    results = {side: summary(v) for side, v in measured.items()}

    print(f"\nSmolLM2-135M-Instruct, {precision}, {prompts} prompts x {generations} completions a step, up to "
          f"{max_new_tokens} new tokens, micro-batch {micro}, {threads} threads; medians of {steps} steps x {rounds} "
          f"rounds a side ({time.perf_counter() - start:.0f} s wall)")
    names = {"ours": "ours (grpo.py)", "trl": "TRL GRPOTrainer"}
    both = "ours" in results and "trl" in results
    print("| per step | " + " | ".join(names[s] for s in results) + (" | ours faster by |" if both else " |"))
    print("|---|" + "---|" * (len(results) + both))
    rows = [("rollout s", "rollout_s", "{:.2f}", True), ("update s", "update_s", "{:.2f}", True),
            ("rollout + update s", "step_s", "{:.2f}", True), ("completion tokens", "tokens", "{:.0f}", None),
            ("longest completion (decode steps)", "longest", "{:.0f}", None),
            ("rollout ms per decode step", "decode_step_ms", "{:.0f}", True),
            ("rollout completion tokens/s", "rollout_tok_s", "{:.1f}", False),
            ("update completion tokens/s", "update_tok_s", "{:.1f}", False), ("mean reward", "reward", "{:.2f}", None)]
    for label, key, fmt, lower_is_better in rows:
        cells = [fmt.format(results[s][key]) for s in results]
        if both:
            o, t = results["ours"][key], results["trl"][key]
            cells.append("" if lower_is_better is None else f"{(t / o if lower_is_better else o / t):.2f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    CLI(main)
