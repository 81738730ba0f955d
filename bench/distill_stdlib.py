"""Does distillation help? The default pretrain run's model teaches a student half its size on the stdlib corpus; the
same student trained for the same steps on the labels alone (CE, --kd.alpha 1) is the baseline. Prints both students'
held-out loss (and the teacher's) on the same validation batches.

    python bench/distill_stdlib.py                    # reuses out/pretrain/stdlib/final, else pretrains it (~5 min)
    python bench/distill_stdlib.py --steps 60         # shorter runs, the same comparison
    python bench/distill_stdlib.py --seeds [1,2,3]    # one pair of students per seed
    python bench/distill_stdlib.py --smollm2 true     # SmolLM2-135M-Instruct teaches a small student: the KD loss falls

Both students start from the same initialisation (same preset, same seed) and read the same batches; only the loss
differs. The runs are distill.py subprocesses, as a user runs them (config_hub/distill_stdlib.yaml).
"""

import csv
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

SMOLLM2_DIR = Path("checkpoints/SmolLM2-135M-Instruct")
# a SmolLM2-shaped student (its tokenizer and tied head) with the width and depth of the stdlib student
SMOLLM2_STUDENT = dict(n_layer=4, n_embd=192, n_head=4, n_kv_head=2, head_dim=48, intermediate_size=512,
                       block_size=256)


def main(steps: int = 150, teacher_dir: Path = Path("out/pretrain/stdlib/final"), out_dir: Path = Path("out/bench"),
         alpha: float = 0.5, temperature: float = 1.0, val_batches: int | None = None, seeds: list[int] = [1337],
         smollm2: bool = False) -> None:
    """Run the comparison.

    Args:
        steps: optimizer steps of each student (16 x 256 tokens each, as the teacher's 150 pretraining steps).
        teacher_dir: the teacher checkpoint; pretrained with config_hub/stdlib.yaml if missing.
        out_dir: the students' runs go to out_dir/distill-ce and out_dir/distill-kd.
        alpha: the distilled student's CE weight (its KD weight is 1 - alpha).
        temperature: the distilled student's temperature.
        val_batches: validation micro-batches of 8 x 256 tokens, the same for every model; None: the whole val
            split (38 micro-batches, 16 files: fewer files make the comparison a matter of which files they are).
        seeds: one CE-only and one distilled student per seed (initialisation and batch order); a run whose
            out_dir/distill-{ce,kd}-seedN already holds its last step is read back, not rerun, so seeds can be
            run in separate processes and then summarised together.
        smollm2: instead, distil checkpoints/SmolLM2-135M-Instruct into a small student and report its KD loss.
    """
    if smollm2:
        return smollm2_kd(steps if steps != 150 else 40, out_dir / "distill-smollm2", alpha, temperature)
    if not (ROOT / "data/stdlib/val/index.json").is_file():
        run([sys.executable, "-m", "data_prep.prepare_stdlib"])
    if not (ROOT / teacher_dir / "model.safetensors").is_file():
        run([sys.executable, "pretrain.py", "--config", "config_hub/stdlib.yaml", "--out_dir", str(teacher_dir.parent)])
    common = ["--config", "config_hub/distill_stdlib.yaml", "--teacher_dir", str(teacher_dir), "--train.max_steps",
              str(steps), "--eval.interval", str(steps), "--eval.max_batches", str(val_batches or 1000),
              "--checkpoint.interval", str(steps)]
    runs = {"CE only (alpha 1)": ("ce", ["--kd.alpha", "1"]),
            f"distilled (alpha {alpha}, T {temperature})": ("kd", ["--kd.alpha", str(alpha), "--kd.temperature",
                                                                  str(temperature)])}
    results = {name: [] for name in runs}
    for seed in seeds:
        for name, (tag, kd) in runs.items():
            run_dir = out_dir / f"distill-{tag}-seed{seed}"
            if not finished(run_dir, steps):
                run([sys.executable, "distill.py", *common, *kd, "--train.seed", str(seed), "--out_dir", str(run_dir)])
            results[name].append(val_loss(run_dir / "final", val_batches))  # as the teacher's, whatever the run used
    teacher_loss = val_loss(teacher_dir, val_batches)

    print(f"\nstdlib, {steps} steps x 16 x 256 tokens per student; val loss over "
          f"{f'{val_batches} x 8 x 256 tokens' if val_batches else 'the whole val split'}")
    print(f"{'model':<40} {'mean':>7}  per seed ({', '.join(map(str, seeds))})")
    print(f"{'teacher ' + str(teacher_dir):<40} {teacher_loss:>7.4f}")
    for name, losses in results.items():
        print(f"{'student, ' + name:<40} {sum(losses) / len(losses):>7.4f}  {', '.join(f'{x:.4f}' for x in losses)}")
    gaps = [ce - kd for ce, kd in zip(*results.values())]
    print(f"CE-only minus distilled, per seed: {', '.join(f'{g:+.4f}' for g in gaps)}")


def finished(run_dir: Path, steps: int) -> bool:
    return (ROOT / run_dir / "final" / "model.safetensors").is_file() and \
        int(read_metrics(run_dir)[-1]["step"]) == steps


def smollm2_kd(steps: int, run_dir: Path, alpha: float, temperature: float) -> None:
    """SmolLM2-135M-Instruct (30 layers, 576 wide) teaches a 4-layer, 192-wide student with its tokenizer, from
    scratch, on the stdlib tokenised by SmolLM2's tokenizer. Prints the KD loss (forward KL per token) along the run."""
    if not (ROOT / SMOLLM2_DIR / "model.safetensors").is_file():
        sys.exit(f"{SMOLLM2_DIR} is missing: `python -m pytest tests/test_real_model.py` builds "
                 ".cache/SmolLM2-135M-Instruct-hf, then `python -m convert.from_hf .cache/SmolLM2-135M-Instruct-hf "
                 f"--out_dir {SMOLLM2_DIR}`")
    data = Path("data/stdlib-smollm2")
    if not (ROOT / data / "val" / "index.json").is_file():
        from data_prep import prepare_text
        from data_prep.prepare_stdlib import EXCLUDE
        prepare_text.main(inputs=sysconfig.get_paths()["stdlib"], tokenizer_dir=ROOT / SMOLLM2_DIR, out_dir=ROOT / data,
                          pattern="*.py", exclude=EXCLUDE, workers=2)
    run([sys.executable, "distill.py", "--teacher_dir", str(SMOLLM2_DIR), "--student_config", "SmolLM2-135M",
         "--student_overrides", json.dumps(SMOLLM2_STUDENT), "--data.train_dirs", json.dumps([str(data / "train")]),
         "--data.val_dir", str(data / "val"), "--kd.alpha", str(alpha), "--kd.temperature", str(temperature),
         "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
         "--train.warmup_steps", str(max(steps // 10, 1)), "--train.lr", "2e-3", "--eval.interval", str(steps),
         "--eval.max_batches", "4", "--checkpoint.interval", str(steps), "--out_dir", str(run_dir)])
    rows = read_metrics(run_dir)
    print(f"\nSmolLM2-135M-Instruct -> {SMOLLM2_STUDENT} student, {steps} steps x 4 x 256 tokens of the stdlib")
    print(f"{'step':>5} {'kd_loss':>8} {'ce_loss':>8}")
    every = max(len(rows) // 8, 1)
    for r in [r for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1]:
        print(f"{r['step']:>5} {float(r['kd_loss']):>8.3f} {float(r['ce_loss']):>8.3f}")
    print(f"val loss {float(rows[-1]['val_loss']):.3f}, val KD {float(rows[-1]['val_kd']):.3f}")


def val_loss(checkpoint_dir: Path, batches: int | None) -> float:
    """A checkpoint's loss over the first `batches` micro-batches of 8 of data/stdlib/val (None: all of them), as
    distill.py validates."""
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

    from checkpoint import load_model
    model = load_model(ROOT / checkpoint_dir).eval()
    val = StreamingDataset(str(ROOT / "data/stdlib/val"), item_loader=TokensLoader(block_size=model.config.block_size
                                                                                   + 1), shuffle=False, drop_last=True)
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(StreamingDataLoader(val, batch_size=8, num_workers=0, drop_last=True)):
            if batches is not None and i >= batches:
                break
            x, y = batch[:, :-1].long(), batch[:, 1:].long()
            losses.append(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
    return (torch.stack(losses).sum() / (len(losses) * 8 * model.config.block_size)).item()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(ROOT / run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    CLI(main)
