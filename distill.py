"""Knowledge distillation: a frozen teacher's next-token distributions teach a smaller student with the same tokenizer.

    python distill.py --config config_hub/distill_stdlib.yaml                                      # 1 CPU, minutes
    python distill.py --teacher_dir checkpoints/SmolLM2-135M-Instruct --student_config SmolLM2-135M \\
        --student_overrides '{n_layer: 8}' --data.train_dirs '[data/smol/train]' --data.val_dir data/smol/val \\
        --precision bf16-true --devices 1                                                          # 1 GPU
    python distill.py ... --teacher_quantize bnb.nf4                                               # teacher in 4 bits
    python distill.py ... --devices 8 --strategy fsdp                # 8 GPUs: teacher and student sharded by FSDP2
    python -m data_prep.teacher_topk --teacher_dir T --data.train_dirs '[data/smol/train]' --topk 64 --out_dir D
    python distill.py ... --teacher_topk_dir D          # the teacher run once, above: training reads its top-64 logits
    python distill.py ... --data.format sft --data.train_files data/alpaca.jsonl --lora.r 16  # chat data, LoRA student
    sbatch config_hub/slurm/pretrain.sbatch  (with this script and config in its srun line)      # N nodes

The loss of a step, over its target tokens (every token of pretraining chunks; the assistant's tokens of SFT data):
    alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)
with D the forward KL, the reverse KL or the generalised JSD(beta) of GKD (Agarwal et al. 2024, arXiv:2306.13649), both
distributions softened by the temperature T, and the T^2 of Hinton et al. 2015 (arXiv:1503.02531) keeping the KD
gradients' scale independent of T. The student starts from --student_dir or from a preset (--student_config) trained
from scratch. Writes out_dir/step-XXXXXXXX/ (with state/ to resume), out_dir/final/ and out_dir/metrics.csv (train_loss,
ce_loss and kd_loss separately), like pretrain.py; a LoRA student writes adapter directories instead.
"""

import json
import math
import sys
import time
from argparse import ArgumentError
from collections import deque
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse import CLI
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, TokensLoader
from torch.distributed import ReduceOp
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from checkpoint import (LORA_WEIGHTS, check_state_dict, check_writable_directory, compute_dtype, load_config,
                        load_model, load_state_dict, read_chunk_index, read_json, require, save_checkpoint, save_lora,
                        weights_dtype)
from generation import generate_tokens
from model import GPT, Block, Config, InputError, LoRAConfig, add_lora, is_lora_key
from report import write_run_report
from sft_data import IGNORE_INDEX, collate, count_targets, load_sft_data, packed_micro_batches
from tokenizer import Tokenizer
from training import (MetricsCSV, StepSampler, StopSignal, clip_gradients, find_resume_dir, gather_full_state,
                      gather_trainable_state, load_full_state, load_train_state, lr_at, make_loggers, make_optimizer,
                      make_strategy, precision_args, prune_checkpoints, restore_rng_states, rng_states, seed_ranks)

METRICS = ["step", "tokens", "train_loss", "ce_loss", "kd_loss", "val_loss", "val_kd", "lr", "tokens_per_sec",
           "on_policy"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class KDArgs:
    alpha: float = 0.5  # weight of the CE on the labels; 1 - alpha weighs the distillation term (alpha 1: no teacher)
    temperature: float = 1.0  # both models' logits are divided by this inside D (and D multiplied by its square)
    divergence: str = "forward_kl"  # forward_kl KL(teacher||student), reverse_kl KL(student||teacher), or jsd
    beta: float = 0.5  # jsd only: the teacher's weight in the mixture, in (0, 1) (GKD's beta)
    chunk_size: int | None = 1024  # target positions per head + loss chunk; None: one chunk, no recompute (more memory)


@dataclass
class DataArgs:
    format: str = "chunks"  # "chunks": litdata token chunks, every token a target; "sft": instruction / chat records
    train_dirs: list[str] = field(default_factory=lambda: ["data/stdlib/train"])  # chunks: litdata chunk directories
    weights: list[float] | None = None  # chunks: sampling weight of each train dir (a mixture); None = equal
    val_dir: str | None = "data/stdlib/val"  # chunks: the held-out split
    train_files: str | list[str] = field(default_factory=list)  # sft: JSON or JSONL: Alpaca, chat or ShareGPT records
    val_files: str | list[str] | None = None  # sft: held-out records; when None, val_split of the train records
    val_split: float = 0.05  # sft: fraction of the train records held out for validation (0: none) unless val_files
    prompt_style: str = "auto"  # sft: chat_template, alpaca, or auto: the chat template when the tokenizer has one
    mask_prompt: bool = True  # sft: learn only the assistant's text (and its end-of-turn token), not the prompt
    packing: bool = False  # sft: several examples per row of block_size tokens, each attending only to itself
    num_workers: int = 1  # loader processes per rank
    shuffle: bool = True

    def __post_init__(self):
        fits = self.weights is None or (len(self.weights) == len(self.train_dirs) and all(w > 0 for w in self.weights))
        require(fits, "--data.weights", self.weights,
                f"one positive weight per train dir ({len(self.train_dirs)}) or null")
        require(self.num_workers >= 0, "--data.num_workers", self.num_workers, "0 (the main process) or more")
        require(0 <= self.val_split < 1, "--data.val_split", self.val_split, "a fraction in [0, 1)")
        require(not self.packing or self.format == "sft", "--data.packing", self.packing,
                "false with --data.format chunks (whose blocks are full already)")


@dataclass
class OnPolicyArgs:
    max_new_tokens: int = 32  # tokens the student samples per on-policy sequence
    temperature: float = 1.0  # the student's sampling temperature

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "--on_policy.max_new_tokens", self.max_new_tokens, "a positive integer")
        require(self.temperature >= 0, "--on_policy.temperature", self.temperature, "0 (greedy) or more")


@dataclass
class TrainArgs:
    global_batch_size: int = 16  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_tokens: int | None = None  # stop after this many training tokens (chunks data)...
    max_steps: int | None = 150  # ...or optimizer steps (the lower wins)...
    max_time: float | None = None  # ...or seconds of training (checkpoint and stop)
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decays to this
    warmup_steps: int = 15
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    seed: int = 1337

    def __post_init__(self):  # bad values fail while the flags are parsed, before any work
        for name in ("global_batch_size", "micro_batch_size", "max_tokens", "max_steps"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"--train.{name}", value, "a positive integer")
        require(self.max_time is None or self.max_time > 0, "--train.max_time", self.max_time, "seconds > 0")
        require(self.lr > 0, "--train.lr", self.lr, "a positive learning rate")
        require(self.min_lr >= 0, "--train.min_lr", self.min_lr, "a learning rate >= 0")
        require(self.warmup_steps >= 0, "--train.warmup_steps", self.warmup_steps, "steps >= 0")
        require(self.weight_decay >= 0, "--train.weight_decay", self.weight_decay, "a number >= 0")
        require(all(0 <= b < 1 for b in self.betas), "--train.betas", list(self.betas), "two numbers in [0, 1)")
        require(self.grad_clip is None or self.grad_clip >= 0, "--train.grad_clip", self.grad_clip,
                "a norm >= 0 (0 or null: no clipping)")


@dataclass
class EvalArgs:
    interval: int = 50  # validate every this many steps (and at the end)
    max_batches: int = 8  # micro-batches of the val split per validation

    def __post_init__(self):
        require(self.interval >= 1, "--eval.interval", self.interval, "steps >= 1")
        require(self.max_batches >= 1, "--eval.max_batches", self.max_batches, "a positive integer")


@dataclass
class CheckpointArgs:
    interval: int = 100  # save out_dir/step-XXXXXXXX every this many steps
    keep_last: int = 2  # how many step checkpoints to keep

    def __post_init__(self):
        require(self.interval >= 1, "--checkpoint.interval", self.interval, "steps >= 1")
        require(self.keep_last >= 1, "--checkpoint.keep_last", self.keep_last, "at least 1 (the newest)")


def setup(
    teacher_dir: Path,
    student_dir: Path | None = None,
    student_config: str | None = None,
    student_overrides: dict = {},
    kd: KDArgs = KDArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    lora: LoRAConfig | None = None,
    out_dir: Path = Path("out/distill/stdlib"),
    teacher_quantize: str | None = None,
    teacher_topk_dir: Path | None = None,
    on_policy_fraction: float = 0.0,
    on_policy: OnPolicyArgs = OnPolicyArgs(),
    resume: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    logger: str = "csv",
    fast_dev_run: bool = False,
) -> None:
    """Distil a teacher checkpoint into a student.

    Args:
        teacher_dir: the teacher's checkpoint directory (frozen, eval mode, no gradients).
        student_dir: start the student from this checkpoint...
        student_config: ...or from this model.py preset, trained from scratch.
        student_overrides: Config fields of the preset to change, e.g. {n_layer: 4, n_embd: 192}.
        kd: the loss: alpha, temperature, divergence, beta, chunk size.
        data: chunk directories or SFT files, and loader settings.
        train: batch sizes, stopping, optimizer and schedule.
        eval: validation interval and size.
        checkpoint: checkpoint interval and retention.
        lora: train a LoRA adapter on --student_dir instead of all its weights (e.g. --lora.r 16).
        out_dir: where checkpoints, metrics.csv and final/ go.
        teacher_quantize: a quantize.py mode for the teacher (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8).
        teacher_topk_dir: the teacher's top-K logits over the training data, written by data_prep/teacher_topk.py
            from this teacher and these --data flags: training reads them and never runs the teacher.
        on_policy_fraction: the share of micro-batches whose continuations the student samples itself and the teacher
            scores (GKD's lambda); those batches train on the KD term only.
        on_policy: sampling settings of those batches.
        resume: "auto" (the newest complete step checkpoint in out_dir, if any) or a step directory.
        devices: devices per node.
        num_nodes: nodes (SLURM sets the rest).
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed.
        strategy: auto (one device), ddp, or fsdp (FSDP2: every Block of both models its own shard group).
        activation_checkpointing: recompute each student Block in the backward pass to save memory.
        logger: csv (always written), plus tensorboard or wandb when named.
        fast_dev_run: a few steps with validation and a checkpoint, to smoke-test a config before a long run.
    """
    # before any work: a file in the way is the user's (never replaced), and final/ is not an input
    check_writable_directory(Path(out_dir) / "final", reads=[teacher_dir, student_dir, teacher_topk_dir])
    if fast_dev_run:
        train.max_steps, train.max_tokens, train.max_time = 4, None, None
        eval.interval, eval.max_batches, checkpoint.interval = 2, 2, 4
    # The resolved arguments, stored in every checkpoint's metadata so that it says how it was made
    run_args = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, **precision_args(precision),
                      strategy=make_strategy(strategy, devices, num_nodes, shard=shard_distiller),
                      loggers=make_loggers(logger, out_dir))
    fabric.launch()
    main(fabric, teacher_dir=Path(teacher_dir), student_dir=student_dir, student_config=student_config,
         student_overrides=student_overrides, kd=kd, data=data, train=train, eval=eval, ckpt=checkpoint, lora=lora,
         out_dir=Path(out_dir), teacher_quantize=teacher_quantize, teacher_topk_dir=teacher_topk_dir,
         on_policy_fraction=on_policy_fraction, on_policy=on_policy, resume=resume, precision=precision,
         strategy=strategy, activation_checkpointing=activation_checkpointing, run_args=run_args)
    for logger in fabric.loggers:  # TensorBoard writes out and closes its event file
        logger.finalize("success")


def main(fabric, *, teacher_dir: Path, student_dir: Path | None, student_config: str | None, student_overrides: dict,
         kd: KDArgs, data: DataArgs, train: TrainArgs, eval: EvalArgs, ckpt: CheckpointArgs, lora: LoRAConfig | None,
         out_dir: Path, teacher_quantize: str | None, teacher_topk_dir: Path | None, on_policy_fraction: float,
         on_policy: OnPolicyArgs, resume: str | None, precision: str, strategy: str, activation_checkpointing: bool,
         run_args: dict) -> None:
    check_kd_args(kd, on_policy_fraction, teacher_topk_dir, teacher_quantize, strategy, lora, student_dir)
    if on_policy_fraction and data.packing:
        raise InputError("--on_policy_fraction with --data.packing: the student continues each row's one prompt; "
                         "drop one of them")
    if teacher_topk_dir and data.packing:
        raise InputError("--teacher_topk_dir with --data.packing: the cache holds one example's logits per row; "
                         "drop one of them")
    teacher_config = load_config(teacher_dir)
    if (student_dir is None) == (student_config is None):
        raise InputError("give --student_dir (a checkpoint) or --student_config (a preset), not both or neither")
    if student_dir is not None:
        config = load_config(student_dir)
    else:
        try:
            config = Config.from_name(student_config, **student_overrides)
        except (ValueError, TypeError) as e:
            raise InputError(f"--student_config {student_config}: {e}") from None
    # The student's checkpoints carry its own tokenizer files (its chat template), or the teacher's for a new student
    tokenizer_dir = Path(student_dir) if student_dir is not None else teacher_dir
    tokenizer = Tokenizer(teacher_dir)
    vocab = check_vocabularies(teacher_dir, tokenizer, student_dir, teacher_config, config)
    if teacher_config.block_size < config.block_size:
        raise InputError(f"the student's block_size {config.block_size} exceeds the teacher's "
                         f"{teacher_config.block_size}: the teacher could not score whole sequences")
    world = fabric.world_size
    if train.global_batch_size % (train.micro_batch_size * world):
        raise InputError(f"--train.global_batch_size {train.global_batch_size} must be a multiple of "
                         f"micro_batch_size x world size = {train.micro_batch_size * world}")
    accum_steps = train.global_batch_size // (train.micro_batch_size * world)
    tokens_per_step = train.global_batch_size * config.block_size
    limits = [s for s in (train.max_steps, train.max_tokens and train.max_tokens // tokens_per_step) if s]
    if not limits:  # the cosine schedule needs an end; --train.max_time alone cannot give one
        raise InputError("set --train.max_steps or --train.max_tokens (at least one step's worth of tokens)")
    max_steps = min(limits)

    fabric.seed_everything(train.seed)
    train_set, val_loader = make_datasets(fabric, data, config, tokenizer, train)
    needs_teacher = kd.alpha < 1  # alpha 1 is plain CE training: the baseline a distilled student is compared with
    teacher, topk = None, None
    if teacher_topk_dir is not None and needs_teacher:  # the teacher's cached logits stand in for it: never loaded
        topk_dirs, topk = open_teacher_topk(Path(teacher_topk_dir), teacher_dir, data, config, vocab, train.seed)
        fabric.print(f"reading the teacher's top-{topk} logits from {teacher_topk_dir}")
        train_loader = make_cached_loader(fabric, topk_dirs, data, train.micro_batch_size, train.seed)
    else:
        if needs_teacher:
            teacher = load_teacher(fabric, teacher_dir, teacher_quantize, precision)
        train_loader = make_train_loader(fabric, train_set, data, train, config.block_size)

    if student_dir is not None:  # on the CPU first: the strategy moves (or shards) it to the devices in setup_module
        student = load_model(student_dir, dtype=weights_dtype(precision))
    else:
        with fabric.init_module():  # the same seed on every rank: identical weights before sharding or DDP
            student = GPT(config)
    if lora is not None:
        add_lora(student, lora)  # only the lora_* tensors train from here on
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(student, check_fn=lambda m: isinstance(m, Block))
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    fabric.print(f"student {config.name}: {sum(p.numel() for p in student.parameters()):,} parameters "
                 f"({trainable:,} trainable); teacher {teacher_config.name}: "
                 f"{f'cached top-{topk}' if topk else 'live' if teacher else 'none'}"
                 f"; {world} rank(s), {accum_steps} micro-batch(es) of {train.micro_batch_size} per rank and step")
    seed_ranks(fabric, train.seed)  # the weights are made: from here on each rank draws its own dropout masks
    model = fabric.setup_module(Distiller(student, teacher, kd, vocab))
    raw_model = model.module  # unwrapped: parameter names without wrapper prefixes
    # after setup: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold. make_optimizer gets
    # the student itself, so that its names (embed.*) decide weight decay and the checkpoints carry no prefix.
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model.student, train.lr, train.weight_decay, train.betas,
                                                       fabric.device))

    state = dict(step=0, tokens=0, train_time=0.0)
    resume_dir = find_resume_dir(fabric, out_dir, resume)
    if resume_dir is not None:
        load_training_state(fabric, resume_dir, raw_model.student, optimizer, train_loader, state, lora is not None,
                            train.seed)
        fabric.print(f"resumed from {resume_dir} at step {state['step']}")

    metrics = MetricsCSV(out_dir / "metrics.csv", METRICS, fabric.global_rank == 0, truncate_after_step=state["step"])
    saver = Saver(fabric, config, tokenizer_dir, lora, student_dir, run_args)
    train_steps = step_batches(train_loader, accum_steps)
    progress = tqdm(total=max_steps, initial=state["step"], disable=fabric.global_rank != 0, desc="distill",
                    dynamic_ncols=True)
    recent = deque(maxlen=10)  # (tokens, seconds) of the last steps' training, eval and checkpoints excluded
    stop_signal = StopSignal(fabric)
    for step in range(state["step"] + 1, max_steps + 1):
        last_step = step == max_steps
        lr = lr_at(step, train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        # All micro-batches of the step first: the loss is normalised by the target tokens of the whole step.
        batches = [to_device(batch, fabric.device) for batch in next(train_steps)]
        # GKD's lambda: which micro-batches the student writes itself, drawn from (seed, step, rank) so that a
        # resumed run makes the same draws
        draw = torch.Generator().manual_seed(train.seed + 1_000_003 * step + 7919 * fabric.global_rank)
        on_policy_flags = (torch.rand(len(batches), generator=draw) < on_policy_fraction).tolist()
        for i, flag in enumerate(on_policy_flags):
            if flag:
                batches[i] = on_policy_batch(raw_model.student, batches[i], on_policy, tokenizer, draw,
                                             fabric.device)
        counts = torch.tensor([[count_targets(b), 0 if flag else count_targets(b), flag]
                               for b, flag in zip(batches, on_policy_flags)], device=fabric.device).sum(0).float()
        targets, data_targets, n_on_policy = fabric.all_reduce(counts, reduce_op="sum").tolist()
        sums = torch.zeros(3, device=fabric.device)  # CE (data batches), KD, the loss
        for micro, (batch, flag) in enumerate(zip(batches, on_policy_flags)):
            with fabric.no_backward_sync(model, enabled=micro < len(batches) - 1):
                ce_sum, kd_sum = model(**batch)
                # SFT and distillation: sums over target tokens divided by the target tokens of the whole optimizer
                # step (every micro-batch, every rank), so every target weighs the same, as in one big batch; times
                # the world size because DDP and FSDP average the ranks' gradients.
                loss = distill_loss(ce_sum, kd_sum, kd, on_policy=flag) * fabric.world_size / targets
                fabric.backward(loss)
            sums += torch.stack([ce_sum.detach() * (not flag), kd_sum.detach(), loss.detach() / fabric.world_size])
        ce_total, kd_total, train_loss = fabric.all_reduce(sums, reduce_op="sum").tolist()
        if not math.isfinite(train_loss):
            raise InputError(f"loss is {train_loss} at step {step}; the last good checkpoint in {out_dir} is "
                             "kept (try a lower --train.lr or --train.grad_clip)")
        if train.grad_clip:
            clip_gradients(fabric, model, optimizer, train.grad_clip, step, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_time = time.perf_counter() - step_start
        state["step"] = step
        state["tokens"] += int(targets)
        state["train_time"] += step_time
        recent.append((targets, step_time))
        # target tokens over the elapsed training time of the last steps (not one step's timestamp)
        tokens_per_sec = sum(t for t, _ in recent) / sum(s for _, s in recent)
        row = dict(step=step, tokens=state["tokens"], train_loss=train_loss,
                   ce_loss=ce_total / data_targets if data_targets else None,
                   kd_loss=kd_total / targets if raw_model.has_kd else None, val_loss=None, val_kd=None, lr=lr,
                   tokens_per_sec=tokens_per_sec, on_policy=int(n_on_policy))
        if val_loader is not None and (step % eval.interval == 0 or last_step):
            row["val_loss"], row["val_kd"] = validate(fabric, model, raw_model, val_loader, eval.max_batches)
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}",
                             **({"kd": f"{row['kd_loss']:.3f}"} if row["kd_loss"] is not None else {}),
                             **({"val": f"{row['val_loss']:.3f}"} if row["val_loss"] is not None else {}),
                             tok_s=f"{tokens_per_sec:,.0f}")
        metrics.log(row)
        fabric.log_dict({k: v for k, v in row.items() if v is not None}, step=step)

        out_of_time = train.max_time is not None and state["train_time"] >= train.max_time
        stop = stop_signal.requested()
        if step % ckpt.interval == 0 or last_step or out_of_time or stop:
            saver.save(out_dir / f"step-{step:08d}", raw_model.student, optimizer, train_loader, state,
                       with_state=True)
            prune_checkpoints(fabric, out_dir, ckpt.keep_last)
        if out_of_time:
            fabric.print(f"--train.max_time {train.max_time}s reached at step {step}")
            break
        if stop:
            progress.close()
            fabric.print(f"SIGUSR1: stopped after step {step}, checkpoint {out_dir / f'step-{step:08d}'}; "
                         "continue with --resume auto")
            stop_signal.requeue()
            return
    progress.close()

    saver.save(out_dir / "final", raw_model.student, optimizer, train_loader, state, with_state=False)
    fabric.print(f"final {'adapter' if lora else 'checkpoint'}: {out_dir / 'final'}")
    write_run_report(out_dir, enabled=fabric.global_rank == 0)  # out_dir/report.png: the run's metrics drawn


def distill_loss(ce_sum: torch.Tensor, kd_sum: torch.Tensor, kd: KDArgs, on_policy: bool = False) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KD. Hinton et al.'s T^2: the KD gradients scale as 1 / T^2, so without it
    raising T would also turn the KD term down. On-policy batches learn from the teacher only: a CE on the student's
    own samples would reinforce them."""
    return (0.0 if on_policy else kd.alpha) * ce_sum + (1 - kd.alpha) * kd.temperature**2 * kd_sum


class Distiller(nn.Module):
    """The student and the frozen teacher as one module, so that Fabric moves, converts and shards them together:
    under FSDP2 each model's Blocks are shard groups and both heads live in the root group, whose forward is this one
    (calling a model's pieces outside a root forward would find its root parameters still sharded)."""

    def __init__(self, student: GPT, teacher: GPT | None, kd: KDArgs, vocab: int):
        super().__init__()
        self.student, self.teacher, self.kd, self.vocab = student, teacher, kd, vocab

    @property
    def has_kd(self) -> bool:
        return self.kd.alpha < 1

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, values: torch.Tensor | None = None,
                indices: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, labels (B, T); values, indices (B, T, K): the teacher's cached top-K logits, if any; doc_ids
        (B, T): packed rows' documents. -> the CE and the KD divergence summed (not averaged) over the target
        positions; the caller normalises."""
        mask = labels != IGNORE_INDEX
        h = self.student.trunk(input_ids, doc_ids=doc_ids)[mask]  # (N, n_embd): the target positions only
        targets = labels[mask]  # (N,)
        h_teacher = None
        if self.has_kd and values is None and self.teacher is not None:  # (cached runs validate without a teacher)
            with torch.no_grad():
                h_teacher = self.teacher.trunk(input_ids, doc_ids=doc_ids)[mask]  # (N, teacher n_embd)
        values, indices = (values[mask], indices[mask]) if values is not None else (None, None)  # (N, K)
        zero = h.float().sum() * 0.0  # keeps the graph connected when a micro-batch has no target at all
        ce_sum, kd_sum = zero, zero.detach()
        chunk = self.kd.chunk_size or max(len(targets), 1)
        for start in range(0, len(targets), chunk):
            part = slice(start, start + chunk)
            args = (self, h[part], targets[part], None if h_teacher is None else h_teacher[part],
                    None if values is None else values[part], None if indices is None else indices[part])
            if self.kd.chunk_size and torch.is_grad_enabled():
                # Only this chunk's hidden states are saved; its logits (both models', fp32) are recomputed in the
                # backward pass, so the B x T x vocab logits never exist at once.
                ce, div = checkpoint(chunk_losses, *args, use_reentrant=False)
            else:
                ce, div = chunk_losses(*args)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + div
        return ce_sum, kd_sum

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: always in eval mode, whatever Fabric asks of the whole
        return self


def chunk_losses(distiller: Distiller, h: torch.Tensor, targets: torch.Tensor, h_teacher: torch.Tensor | None,
                 values: torch.Tensor | None, indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and KD of n target positions: h (n, n_embd), targets (n,); the teacher as hidden states (n, C_t)
    or as its cached top-K logits, values and indices (n, K). Everything in fp32."""
    kd = distiller.kd
    logits = distiller.student.head(h).float()  # (n, vocab_size)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if not distiller.has_kd or (h_teacher is None and indices is None):
        return ce, ce.new_zeros(())
    if indices is not None:
        # Cached top-K: D over the teacher's K support. The teacher's probabilities are softmax(values / T) over
        # its K logits; the student's are log_softmax over ITS logits at the same K ids, / T: both renormalised on
        # the support, so D is a true divergence of two distributions on the same K tokens (zero when the student
        # ranks them as the teacher does) and with K = the vocabulary it is the full-vocabulary loss exactly. The
        # student's mass outside the support is left to the CE term. (Axolotl's top-K KD offers this as
        # top_k_before_softmax; its default normalises the student over the whole vocabulary instead, which is not
        # zero at a match and keeps pulling mass into the support.)
        student, teacher = logits.gather(-1, indices.long()), values.float()  # (n, K)
    else:
        with torch.no_grad():
            teacher = distiller.teacher.head(h_teacher).float()
        # vocab_size may be padded past the tokenizer differently in the two models: compare the shared ids
        student, teacher = logits[:, :distiller.vocab], teacher[:, :distiller.vocab]
    return ce, divergence(student / kd.temperature, teacher / kd.temperature, kd.divergence, kd.beta).sum()


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """D(teacher || student) per position over the last dim, in fp32: (..., V) twice -> (...).

    jsd is GKD's generalised JSD (Agarwal et al. 2024, eq. 1) with P = teacher and Q = student:
        JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta * P + (1 - beta) * Q,
    the convention of TRL's GKDTrainer.generalized_jsd_loss (M is `beta * teacher + (1 - beta) * student` there).
    We keep it so that --kd.beta means what it means in TRL and the paper: JSD_beta / beta tends to the forward
    KL(P || Q) as beta -> 0 and JSD_beta / (1 - beta) to the reverse KL(Q || P) as beta -> 1. (TRL also accepts beta
    0 and 1 as those KLs; here those are --kd.divergence forward_kl and reverse_kl.)"""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def batches_forever(loader):
    # Each pass over a loader is one epoch (reshuffled by epoch number). After load_state_dict the first pass
    # continues the interrupted epoch where it stopped, so resume never replays batches.
    while True:
        yield from loader


def step_batches(loader, accum_steps: int):
    """The micro-batches of each optimizer step: an SFTLoader's own steps (packed: as many as the rows need), or
    accum_steps of a litdata loader's."""
    if isinstance(loader, SFTLoader):
        yield from loader
        return
    batches = batches_forever(loader)
    while True:
        yield [next(batches) for _ in range(accum_steps)]


def to_device(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch as {input_ids, labels (B, T) [, values, indices (B, T, K)]} on the device. Token chunks come as
    (B, T + 1) blocks: inputs and targets shifted by one, every token a target."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}
    out = {k: v.to(device) for k, v in batch.items()}
    out["input_ids"], out["labels"] = out["input_ids"].long(), out["labels"].long()
    return out


@torch.no_grad()
def on_policy_batch(student: GPT, batch: dict[str, torch.Tensor], args: OnPolicyArgs, tokenizer: Tokenizer,
                    draw: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """GKD's on-policy data: the student continues each row's prompt by sampling, and the continuation (up to and
    including the stop token it emitted) becomes the targets. The prompt of an SFT row is everything before its first
    target (the user's turn); of a token block, all but its last max_new_tokens tokens."""
    input_ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    block_size = student.config.block_size
    prompts = []
    for ids, row in zip(input_ids, labels):
        targets = [t for t, y in enumerate(row) if y != IGNORE_INDEX]
        if len(targets) == len(row):  # a block of chunks, every position a target: its end is resampled
            cut = max(len(ids) - args.max_new_tokens, 1)
        else:  # SFT: labels[t] is token t + 1, so the prompt is input_ids up to the first target position
            cut = targets[0] + 1 if targets else len(ids)
        prompts.append(ids[:cut][-(block_size - 1):])  # leave room for at least one new token
    stops = set(tokenizer.stop_ids)
    generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=draw)))
    new = [[] for _ in prompts]
    done = [False] * len(prompts)
    was_training = student.training
    student.eval()
    try:
        for tokens in generate_tokens(student, prompts, args.max_new_tokens, temperature=args.temperature,
                                      stop_ids=sorted(stops), generator=generator):
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    new[row].append(token)  # the stop token too: emitting it is part of what is learnt
                    done[row] = token in stops
    finally:
        student.clear_kv_cache()
        student.train(was_training)
    examples = [{"input_ids": torch.tensor(p + n[:-1]),
                 "labels": torch.tensor([IGNORE_INDEX] * (len(p) - 1) + n)} for p, n in zip(prompts, new)]
    return to_device(collate(examples, pad_id=tokenizer.eos_id or 0), device)


@torch.no_grad()
def validate(fabric, model, raw_model, val_loader, max_batches: int) -> tuple[float, float | None]:
    """The student's CE on held-out data (what the bench compares), and the KD divergence to a live teacher."""
    model.eval()
    sums = torch.zeros(3, device=fabric.device)
    for i, batch in enumerate(val_loader):
        if i >= max_batches:
            break
        batch = to_device(batch, fabric.device)
        ce_sum, kd_sum = model(**batch)
        sums += torch.stack([ce_sum, kd_sum, torch.tensor(float(count_targets(batch)), device=fabric.device)])
    model.train()
    ce_sum, kd_sum, n = fabric.all_reduce(sums, reduce_op="sum").tolist()
    live_teacher = raw_model.has_kd and raw_model.teacher is not None
    return ce_sum / n, (kd_sum / n if live_teacher else None)


def check_kd_args(kd: KDArgs, on_policy_fraction, teacher_topk_dir, teacher_quantize, strategy, lora,
                  student_dir) -> None:
    if not 0 <= kd.alpha <= 1:
        raise InputError(f"--kd.alpha must be in [0, 1], got {kd.alpha}")
    if kd.temperature <= 0:
        raise InputError(f"--kd.temperature must be positive, got {kd.temperature}")
    if kd.divergence not in DIVERGENCES:
        raise InputError(f"--kd.divergence {kd.divergence!r}: expected one of {', '.join(DIVERGENCES)}")
    if kd.divergence == "jsd" and not 0 < kd.beta < 1:
        raise InputError(f"--kd.beta must be in (0, 1) for jsd, got {kd.beta}; beta 0 and 1 are the limits "
                         "--kd.divergence forward_kl and reverse_kl")
    if kd.chunk_size is not None and kd.chunk_size < 1:
        raise InputError(f"--kd.chunk_size must be at least 1 (or null: no chunking), got {kd.chunk_size}")
    if not 0 <= on_policy_fraction <= 1:
        raise InputError(f"--on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
    if on_policy_fraction and kd.alpha == 1:
        raise InputError("--on_policy_fraction needs a KD term (--kd.alpha < 1): on-policy batches learn only it")
    if on_policy_fraction and teacher_topk_dir:
        raise InputError("--on_policy_fraction needs a live teacher to score the student's samples; "
                         "drop --teacher_topk_dir")
    if on_policy_fraction and strategy == "fsdp":
        raise InputError("--on_policy_fraction with --strategy fsdp: the student cannot sample from sharded "
                         "weights; use ddp")
    if teacher_quantize and teacher_topk_dir:
        raise InputError("--teacher_quantize with --teacher_topk_dir: the cached teacher is not run here (quantise it "
                         "where the cache is built: data_prep/teacher_topk.py --quantize)")
    if teacher_quantize and strategy == "fsdp":
        raise InputError("--teacher_quantize with --strategy fsdp: a quantised teacher is not sharded; "
                         "use one or the other")
    if lora is not None and student_dir is None:
        raise InputError("--lora adapts a trained student: give --student_dir (LoRA on a model trained from "
                         "scratch would leave its random weights frozen)")


def check_vocabularies(teacher_dir: Path, tokenizer: Tokenizer, student_dir: Path | None, teacher_config: Config,
                       config: Config) -> int:
    """Distillation compares the two models' logits id by id, so an id must mean the same token to both: the same
    tokenizer vocabulary (a different tokenizer.json with the same vocabulary, e.g. other normalisation, would be
    harmless here: the data is tokenised once). Returns how many logits are compared: the shared vocab_size
    (either model may pad its vocab_size past the tokenizer's)."""
    if student_dir is not None:
        student_file = Path(student_dir) / "tokenizer.json"
        if not (student_file.is_file() and student_file.read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()):
            teacher_vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
            student_vocab = Tokenizer(student_dir).backend.get_vocab(with_added_tokens=True)
            if teacher_vocab != student_vocab:
                by_id_t = {i: t for t, i in teacher_vocab.items()}
                by_id_s = {i: t for t, i in student_vocab.items()}
                differ = sorted(i for i in set(by_id_t) | set(by_id_s) if by_id_t.get(i) != by_id_s.get(i))
                i = differ[0]
                raise InputError(
                    f"the teacher's tokenizer ({len(teacher_vocab)} tokens, {teacher_dir}) and the student's "
                    f"({len(student_vocab)} tokens, {student_dir}) differ at {len(differ)} ids, e.g. id {i}: "
                    f"{by_id_t.get(i)!r} vs {by_id_s.get(i)!r}; distillation needs one tokenizer for both")
    n_tokens = tokenizer.vocab_size
    for who, c in (("teacher", teacher_config), ("student", config)):
        if c.vocab_size < n_tokens:
            raise InputError(f"the {who}'s vocab_size {c.vocab_size} is smaller than the tokenizer's {n_tokens} "
                             f"tokens; give the student the teacher's vocab_size {teacher_config.vocab_size}")
    return min(teacher_config.vocab_size, config.vocab_size)


def load_teacher(fabric, teacher_dir: Path, quantize: str | None, precision: str) -> GPT:
    """Frozen and in eval mode. Unquantised it is loaded on the CPU, and Fabric moves and shards it with the student;
    quantised, on the device it runs on (as quantize_model requires)."""
    if quantize is None:
        teacher = load_model(teacher_dir, dtype=weights_dtype(precision))
    else:  # the 4-bit layers dequantise to the matmuls' dtype: the half type of a mixed precision too
        dtype = compute_dtype(precision)
        teacher = load_model(teacher_dir, device=fabric.device, dtype=dtype, quantize=quantize, compute_dtype=dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def shard_distiller(model: Distiller, device_mesh) -> Distiller:
    """FSDP2: every Block of the student and of the teacher its own shard group, then the rest (both embeddings,
    norms and heads) at the root, whose forward (Distiller.forward) gathers them. FSDP2 allows the teacher's frozen
    parameters in the same groups as trainable ones."""
    from torch.distributed.fsdp import fully_shard
    mesh = device_mesh["data_parallel"]
    for gpt in (model.student, model.teacher):
        for block in gpt.layers if gpt is not None else []:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---- data -----------------------------------------------------------------------------------------------------------

def make_datasets(fabric, data: DataArgs, config: Config, tokenizer: Tokenizer, train: TrainArgs):
    """The training set (a list of litdata datasets of blocks, or an SFTDataset) and the validation loader."""
    world, micro_batch_size = fabric.world_size, train.micro_batch_size
    if data.format == "chunks":
        for d in data.train_dirs + ([data.val_dir] if data.val_dir else []):
            read_chunk_index(d)
        # block_size + 1 tokens per sample: inputs and the targets shifted by one. One TokensLoader per dataset:
        # it caches chunk buffers by chunk index, and two splits both have a chunk 0.
        # item_shuffle_window 0: each chunk's samples in a full permutation (as pretrain.make_loaders, which says why)
        datasets = [StreamingDataset(d, item_loader=TokensLoader(block_size=config.block_size + 1),
                                     shuffle=data.shuffle, drop_last=True, seed=train.seed, item_shuffle_window=0)
                    for d in data.train_dirs]
        for d, ds in zip(data.train_dirs, datasets):
            if len(ds) < micro_batch_size * world:
                raise InputError(f"{d}: {len(ds)} samples of block_size+1 = {config.block_size + 1} tokens, fewer "
                                 "than one micro-batch per rank; use more data or a smaller block_size")
        val_loader = None
        if data.val_dir:
            val_set = StreamingDataset(data.val_dir, item_loader=TokensLoader(block_size=config.block_size + 1),
                                       shuffle=False, drop_last=True)
            if len(val_set) >= micro_batch_size * world:
                val_loader = StreamingDataLoader(val_set, batch_size=micro_batch_size, num_workers=0, drop_last=True)
            else:
                fabric.print(f"warning: {data.val_dir} holds less than one micro-batch per rank; no validation")
        return datasets, val_loader
    if data.format != "sft":
        raise InputError(f"--data.format {data.format!r}: expected chunks or sft")
    if not data.train_files:
        raise InputError("--data.format sft: name the JSON or JSONL files to train on with --data.train_files")
    train_set, val_set, stats = load_sft_data(
        data.train_files, tokenizer, prompt_style=data.prompt_style, mask_prompt=data.mask_prompt,
        max_seq_length=config.block_size, val_split=0.0 if data.val_files else data.val_split,
        val_paths=data.val_files, seed=train.seed)
    fabric.print(f"{stats['train']:,} train and {stats['val']:,} val examples; {stats['train_targets']:,} of the "
                 f"{stats['train_tokens']:,} train tokens are targets; {stats['truncated']:,} example(s) truncated to "
                 f"{config.block_size} tokens, {stats['dropped']:,} dropped")
    if len(train_set) < train.global_batch_size:
        raise InputError(f"{len(train_set)} training examples, fewer than one --train.global_batch_size "
                         f"({train.global_batch_size})")
    # this rank's share of the held-out micro-batches, as many on every rank (under FSDP each forward is a collective)
    starts = range(0, len(val_set) - micro_batch_size + 1, micro_batch_size)
    starts = starts[:len(starts) // world * world][fabric.global_rank::world]
    val_loader = [collate([val_set[i] for i in range(s, s + micro_batch_size)], val_set.pad_id) for s in starts]
    return train_set, val_loader or None


def make_train_loader(fabric, train_set, data: DataArgs, train: TrainArgs, block_size: int):
    if data.format == "sft":
        return SFTLoader(fabric, train_set, StepSampler(len(train_set), train.global_batch_size, train.micro_batch_size,
                                                        fabric.global_rank, fabric.world_size, train.seed),
                         block_size if data.packing else None)
    dataset = train_set[0] if len(train_set) == 1 else CombinedStreamingDataset(
        train_set, seed=train.seed, weights=data.weights, iterate_over_all=False)
    return StreamingDataLoader(dataset, batch_size=train.micro_batch_size, num_workers=data.num_workers,
                               drop_last=True)


class SFTLoader:
    """The micro-batches of training.StepSampler's steps, a step at a time (packed with row_length); its state is the
    sampler's position (whole steps: a checkpoint is taken after all micro-batches of a step)."""

    def __init__(self, fabric, dataset, sampler: StepSampler, row_length: int | None):
        self.fabric, self.dataset, self.sampler, self.row_length = fabric, dataset, sampler, row_length

    def __iter__(self):
        while True:
            examples = [[self.dataset[i] for i in ids] for ids in self.sampler.next_step()]
            yield make_micro_batches(self.fabric, examples, self.dataset.pad_id, self.row_length)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def make_micro_batches(fabric, examples: list[list[dict]], pad_id: int, row_length: int | None) -> list[dict]:
    """This rank's micro-batches of a step: the sampler's, each padded to its longest example; or, with row_length,
    the same examples packed into rows of row_length tokens, micro_batch_size rows per micro-batch (the tokens of
    the padded run's worst case) and as many micro-batches on every rank (under FSDP each forward is a collective)."""
    if row_length is None:
        return [collate(e, pad_id) for e in examples]
    # On CUDA every row is row_length long: one shape, which the compiled FlexAttention kernel is built for. Elsewhere
    # a micro-batch is one row without padding, attended a document at a time (model.py's varlen path).
    batches = packed_micro_batches([x for e in examples for x in e], len(examples[0]), row_length, pad_id,
                                   fixed_rows=fabric.device.type == "cuda")
    if fabric.world_size > 1:
        count = fabric.all_reduce(torch.tensor(len(batches), device=fabric.device), reduce_op=ReduceOp.MAX)
        nothing = dict(batches[0], labels=torch.full_like(batches[0]["labels"], IGNORE_INDEX))  # adds no target
        batches += [nothing] * (int(count) - len(batches))
    return batches


# ---- the teacher's top-K logits, from data_prep/teacher_topk.py -----------------------------------------------------

def open_teacher_topk(topk_dir: Path, teacher_dir: Path, data: DataArgs, config: Config, vocab: int,
                      seed: int) -> tuple[list[Path], int]:
    """The cache directory of each training source (topk_dir/train-i) and their K. Each meta.json must say it was
    built from this run's teacher, vocabulary and data (the fields data_prep/teacher_topk.py writes): a cache of
    another teacher or data is an error, never silently read."""
    weights = teacher_dir / "model.safetensors"
    if not weights.is_file():  # its size and time tell which teacher a cache was built from
        raise InputError(f"{weights}: not found; a checkpoint directory holds model.safetensors")
    sources = data.train_dirs if data.format == "chunks" else [data.train_files]
    dirs, topk = [], None
    for i, source in enumerate(sources):
        path = topk_dir / f"train-{i}"
        if not (path / "meta.json").is_file():
            raise InputError(f"{path}/meta.json: not found; build the teacher's top-K logits of {source} with "
                             "python -m data_prep.teacher_topk and this run's --data flags")
        built, _ = read_json(path / "meta.json"), read_chunk_index(path)  # corrupt files: one line naming them
        if not isinstance(built, dict):
            raise InputError(f"{path}/meta.json: not a teacher cache's meta.json; build it again")
        expected = dict(teacher=str(weights.resolve()), teacher_bytes=weights.stat().st_size,
                        teacher_mtime_ns=weights.stat().st_mtime_ns, topk=topk or built.get("topk"), vocab=vocab,
                        format=data.format, source=source, block_size=config.block_size,
                        prompt_style=data.prompt_style, mask_prompt=data.mask_prompt, val_split=data.val_split,
                        val_files=data.val_files, split_seed=seed if data.format == "sft" else None)
        changed = [k for k in expected if built.get(k) != expected[k]]
        if changed:
            key = changed[0]
            raise InputError(f"{path}: a teacher cache built for another {key} ({built.get(key)!r}, this run: "
                             f"{expected[key]!r}); build one for this run with data_prep/teacher_topk.py")
        dirs.append(path)
        topk = built["topk"]  # every source's the same: a micro-batch of a mixture stacks (T, K) rows of several
    return dirs, topk


def make_cached_loader(fabric, cache_dirs: list[Path], data: DataArgs, micro_batch_size: int, seed: int):
    datasets = [StreamingDataset(str(d), shuffle=data.shuffle, drop_last=True, seed=seed, item_shuffle_window=0)
                for d in cache_dirs]
    for d, ds in zip(cache_dirs, datasets):
        if len(ds) < micro_batch_size * fabric.world_size:
            raise InputError(f"{d}: {len(ds)} cached samples, fewer than one micro-batch per rank")
    dataset = datasets[0] if len(datasets) == 1 else CombinedStreamingDataset(
        datasets, seed=seed, weights=data.weights, iterate_over_all=False)
    return StreamingDataLoader(dataset, batch_size=micro_batch_size, num_workers=data.num_workers, drop_last=True,
                               collate_fn=collate_cached)


def collate_cached(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad cached samples (SFT examples differ in length): labels with IGNORE_INDEX, the rest with zeros."""
    T = max(len(x["input_ids"]) for x in items)
    out = {}
    for key, value in {"input_ids": 0, "labels": IGNORE_INDEX, "values": 0.0, "indices": 0}.items():
        # F.pad's last pair pads the last dim: (T,) rows pad it, (T, K) rows pad the dim before it
        out[key] = torch.stack([F.pad(x[key], (0, T - len(x[key])) if x[key].dim() == 1 else (0, 0, 0, T - len(x[key])),
                                      value=value) for x in items])
    return out


# ---- checkpoints ----------------------------------------------------------------------------------------------------

class Saver:
    """Step and final directories that every script reads: a full checkpoint, or a LoRA adapter pointing at the
    student's base checkpoint; with state/ (optimizer, loader position, RNG, counters) to resume."""

    def __init__(self, fabric, config: Config, tokenizer_dir: Path, lora: LoRAConfig | None, base_dir, run_args):
        self.fabric, self.config, self.tokenizer_dir, self.lora, self.base_dir = fabric, config, tokenizer_dir, lora, \
            base_dir
        self.run_args = run_args

    def save(self, path: Path, student: GPT, optimizer, train_loader, state: dict, with_state: bool) -> None:
        # an adapter gathers only the trainable tensors: under FSDP a checkpoint costs the adapter's size
        gather = gather_trainable_state if self.lora is not None else gather_full_state
        model_state, optim_state = gather(student, optimizer, with_optimizer=with_state)
        loader_state = train_loader.state_dict() if with_state else None
        rng = rng_states(self.fabric)  # a collective: every rank
        if self.fabric.global_rank == 0:
            train_state = dict(optimizer=optim_state, train_loader=loader_state, **rng, **state)
            train_state = train_state if with_state else None
            metadata = dict(script=Path(__file__).name, step=state["step"],
                            args=json.dumps(self.run_args, default=str))
            if self.lora is not None:
                save_lora(path, self.lora, {k: v for k, v in model_state.items() if is_lora_key(k)}, self.base_dir,
                          self.tokenizer_dir, metadata=metadata, train_state=train_state)
            else:
                save_checkpoint(path, self.config, model_state, self.tokenizer_dir, metadata=metadata,
                                train_state=train_state)
        self.fabric.barrier()


def load_training_state(fabric, path: Path, student: GPT, optimizer, train_loader, state: dict,
                        is_lora: bool, seed: int) -> None:
    saved = load_train_state(path)
    weights = path / (LORA_WEIGHTS if is_lora else "model.safetensors")
    state_dict = load_state_dict(weights)
    check_state_dict(student, state_dict, weights, lora=is_lora)  # a step checkpoint of another student or --lora
    # strict=False for an adapter: the base weights come from --student_dir, not from the step directory
    load_full_state(student, optimizer, state_dict, saved["optimizer"], strict=not is_lora)
    train_loader.load_state_dict(saved["train_loader"])
    restore_rng_states(fabric, saved, seed)
    state.update(step=saved["step"], tokens=saved["tokens"], train_time=saved["train_time"])


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(setup, exit_on_error=False, as_positional=False)  # --teacher_dir, not a positional argument
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
    except ValueError as e:  # jsonargparse reports a bad --lora.r (`LoRAConfig | None`) as no Union member matching,
        if not isinstance(e.__cause__, InputError):  # the LoRAConfig error as its cause; other errors are bugs
            raise
        sys.exit(f"error: {e.__cause__}")
