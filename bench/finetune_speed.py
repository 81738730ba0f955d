"""Seconds per optimizer step of LoRA and full finetuning: ours beside LitGPT's, same model, data and run.

    python bench/finetune_speed.py                          # SmolLM2-135M-Instruct, fp32, LoRA then full
    python bench/finetune_speed.py --modes lora --steps 16
    python bench/finetune_speed.py --precision bf16-true    # bf16 weights and optimizer state in every implementation
    python bench/finetune_speed.py --modes qlora --precision bf16-true    # nf4 base: ours beside PEFT + bitsandbytes

The finetuning issue's setting: SmolLM2-135M-Instruct, Alpaca records (instruction + output, no input), micro =
global batch 4, LoRA r 8 on the query and value projections (alpha 16, dropout 0.05), fp32 (or `--precision
bf16-true`), 2 threads. Every record has the same length (words drawn with a fixed seed), so every step holds the
same number of tokens in both implementations whatever order they shuffle the records in. Ours is finetune_lora.py /
finetune_full.py, LitGPT's is `litgpt finetune_lora` / `litgpt finetune_full` from .venv-peers, each in its own
process, one after the other.
s/step: the mean over the last `--window` steps, evaluation and checkpointing excluded (ours: its tokens/s over the
last 10 steps, from metrics.csv; LitGPT: its printed per-iteration time, one iteration = one step here).
LitGPT needs its own checkpoint: the transformers copy of the model is converted once into .cache/bench-finetune.
transformers (full) and transformers + PEFT (LoRA, same targets and hyperparameters) run as a plain loop in
.venv-peers (`pip install peft` there): the same rendered Alpaca prompts tokenised by the model's tokenizer, batches
of 4, the model's own loss on the response tokens, AdamW; s/step = the mean of its last `--window` steps, batch
assembly included; bf16-true loads the model in bfloat16 there (PEFT keeps its adapters in fp32, its default).
`--rounds N` runs every implementation N times, alternating, and reports medians.
qlora is LoRA on an nf4 base (bitsandbytes; compute dtype = the precision's): ours `--quantize bnb.nf4`, PEFT through
transformers' BitsAndBytesConfig (`pip install bitsandbytes` in .venv-peers); LitGPT's refuses CPUs ("Bitsandbytes is
only supported on CUDA GPUs"), so it runs there only on a GPU.
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
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
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
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", choices=["32-true", "bf16-true"], default="32-true")
    parser.add_argument("--hf_loop", choices=["lora", "qlora", "full"], help=argparse.SUPPRESS)  # the peer venv's side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_loop:
        return hf_loop(args.hf_loop, Path(args.work), args.steps, args.window, args.threads, args.precision)

    work = Path(tempfile.mkdtemp(prefix="finetune_speed-"))
    rng = random.Random(0)
    records = [{"instruction": " ".join(rng.choices(WORDS, k=12)) + "?", "input": "",
                "output": " ".join(rng.choices(WORDS, k=args.words)) + "."} for _ in range(64)]
    (work / "alpaca.json").write_text(json.dumps(records))
    # what the transformers loop trains on: ours' Alpaca prompt text (sft_data renders it; bos + prompt + response
    # + eos), the response after it
    sys.path.insert(0, str(ROOT))
    from sft_data import alpaca_prompt
    (work / "prompts.json").write_text(json.dumps([[alpaca_prompt(r["instruction"]), r["output"]] for r in records]))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    peers = {"ours": ours}
    if PEER.is_file() and litgpt_checkpoint():
        peers["LitGPT"] = litgpt
    if PEER.is_file() and HF_DIR.is_dir():
        peers["transformers"] = hf

    results = {}  # (mode, impl) -> s/step of each round
    for mode in args.modes:
        for _ in range(args.rounds):
            for impl, fn in peers.items():
                if impl == "transformers" and mode != "full" and not has_peft(mode):
                    continue
                if impl == "LitGPT" and mode == "qlora" and not torch_cuda():
                    continue
                results.setdefault((mode, impl), []).append(fn(mode, args, work, env))
                print(json.dumps({f"{mode} {impl}": results[mode, impl][-1]}), flush=True)
    shutil.rmtree(work)

    print(f"\nSmolLM2-135M-Instruct, {args.precision}, micro = global batch 4, {args.steps} steps, mean s/step of "
          f"the last {args.window}, OMP_NUM_THREADS={args.threads}"
          + (f", medians of {args.rounds} rounds" if args.rounds > 1 else ""))
    others = [impl for impl in peers if impl != "ours"]
    print("| mode | ours s/step | " + " | ".join(f"{p} s/step | {p} / ours" for p in others) + " |")
    print("|---|---|" + "---|---|" * len(others))
    for mode in args.modes:
        o = statistics.median(results[mode, "ours"])
        cells = []
        for p in others:
            v = results.get((mode, p))
            cells += [f"{statistics.median(v):.3f}", f"{statistics.median(v) / o:.2f}"] if v else ["-", "-"]
        print(f"| {mode} | {o:.3f} | " + " | ".join(cells) + " |")


def ours(mode: str, args, work: Path, env: dict) -> float:
    out = work / f"ours-{mode}"
    cmd = [sys.executable, "finetune_full.py" if mode == "full" else "finetune_lora.py", "--checkpoint_dir",
           args.checkpoint_dir, "--data.train_files", str(work / "alpaca.json"), "--data.val_split", "0",
           "--data.prompt_style", "alpaca",  # LitGPT's JSON data renders the Alpaca prompt too
           "--out_dir", str(out), "--precision", args.precision, "--train.global_batch_size", "4",
           "--train.micro_batch_size", "4", "--train.epochs", "null", "--train.max_steps", str(args.steps),
           "--train.warmup_steps", "2", "--eval.interval", str(args.steps), "--eval.max_new_tokens", "1",
           "--eval.prompt", "hi", "--checkpoint.interval", str(args.steps)]
    if mode != "full":
        cmd += ["--lora.targets", "[q,v]", "--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.05"]
    if mode == "qlora":
        cmd += ["--quantize", "bnb.nf4"]
    run(cmd, env)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    tokens_per_step = int(rows[-1]["tokens"]) - int(rows[-2]["tokens"])
    return tokens_per_step / float(rows[-1]["tokens_per_sec"])  # tokens/s is over the last 10 steps


def litgpt(mode: str, args, work: Path, env: dict) -> float:
    cmd = [str(PEER), "finetune_full" if mode == "full" else "finetune_lora", str(LITGPT_DIR), "--data", "JSON",
           "--data.json_path", str(work / "alpaca.json"), "--data.val_split_fraction", "0.05",
           "--out_dir", str(work / f"litgpt-{mode}"), "--precision", args.precision, "--devices", "1",
           "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps", str(args.steps),
           "--train.lr_warmup_steps", "2", "--train.save_interval", "1000", "--train.log_interval", "1",
           "--eval.interval", "1000", "--eval.initial_validation", "false", "--eval.final_validation", "false",
           "--logger_name", "csv"]
    if mode != "full":
        cmd += ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_query", "true",
                "--lora_key", "false", "--lora_value", "true", "--lora_projection", "false", "--lora_mlp", "false",
                "--lora_head", "false"]
    if mode == "qlora":
        cmd += ["--quantize", "bnb.nf4"]
    output = run(cmd, env)
    times = [float(t) / 1000 for t in re.findall(r"iter time: ([\d.]+) ?ms", output)]
    if len(times) < args.window:
        sys.exit(f"LitGPT printed {len(times)} iteration times:\n{output[-3000:]}")
    return statistics.mean(times[-args.window:])


def hf(mode: str, args, work: Path, env: dict) -> float:
    cmd = [str(PEER_PYTHON), __file__, "--hf_loop", mode, "--work", str(work), "--steps", str(args.steps),
           "--window", str(args.window), "--threads", str(args.threads), "--precision", args.precision]
    line = next(x for x in run(cmd, env).splitlines() if x.startswith('{"s_per_step"'))
    return json.loads(line)["s_per_step"]


def has_peft(mode: str) -> bool:
    needs = "import peft" + (", bitsandbytes" if mode == "qlora" else "")
    return subprocess.run([str(PEER_PYTHON), "-c", needs], capture_output=True).returncode == 0


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def hf_loop(mode: str, work: Path, steps: int, window: int, threads: int, precision: str) -> None:
    """transformers (+ PEFT for LoRA) finetuning, written as its model card's plain training loop would be."""
    import time

    import torch
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(HF_DIR)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    quantization = None
    if mode == "qlora":
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype, quantization_config=quantization)
    if mode == "qlora":  # quantised, not silently loaded in float
        import bitsandbytes
        assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules()), "no 4-bit layers"
    if mode != "full":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                           target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    examples = []
    for prompt, response in json.loads((work / "prompts.json").read_text()):
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]))
    random.Random(0).shuffle(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=2e-5 if mode == "full" else 2e-4)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(4)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"s_per_step": statistics.mean(times[-window:]), "loss": loss.item(),
                      "times": [round(t, 3) for t in times]}))


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
