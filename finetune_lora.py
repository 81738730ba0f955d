"""Finetune a LoRA adapter on a frozen checkpoint with instruction or chat data (JSON/JSONL: Alpaca, chat, ShareGPT);
QLoRA when --quantize names a bitsandbytes mode (the frozen base is quantised after loading its float weights).

    python finetune_lora.py --config config_hub/finetune_lora.yaml --precision 32-true --fast_dev_run true  # 1 CPU
    python finetune_lora.py --config config_hub/finetune_lora.yaml                                    # 1 GPU
    python finetune_lora.py --config config_hub/finetune_lora.yaml --quantize bnb.nf4 --precision bf16-true  # QLoRA
    python finetune_lora.py --config config_hub/finetune_lora.yaml --devices 8 --strategy fsdp        # 8 GPUs, FSDP2
    srun python finetune_lora.py --config config_hub/finetune_lora.yaml --devices 8 --num_nodes 2 --strategy fsdp \\
        --resume auto                                  # SLURM: as the srun line of config_hub/slurm/pretrain.sbatch

Every flag overrides the YAML (`--lora.r 16`); `--print_config` shows the result. A run writes adapter directories
out_dir/step-XXXXXXXX/ (lora.safetensors + lora_config.yaml naming the base + tokenizer, and state/ to resume with
--resume auto), out_dir/final/ and out_dir/metrics.csv, whose `sample` column holds what the model answered to
--eval.prompt at each validation. Use the adapter with
    python generate.py --lora_dir out/finetune/lora/final --prompt "..."
    python -m convert.merge_lora --lora_dir out/finetune/lora/final --out_dir checkpoints/my-merged-model
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
from jsonargparse import CLI
from torch.distributed import ReduceOp
from tqdm import tqdm

from checkpoint import (LORA_WEIGHTS, check_state_dict, check_writable_directory, load_config, load_model,
                        load_state_dict, require, save_lora, weights_dtype)
from generation import generate
from model import Block, InputError, LoRAConfig, add_lora, is_lora_key, lora_summary, router_aux_loss
from report import write_run_report
from sft_data import (IGNORE_INDEX, collate, count_targets, encode_prompt, load_sft_data, packed_micro_batches,
                      resolve_style)
from tokenizer import Tokenizer
from training import (MetricsCSV, StepSampler, StopSignal, clip_gradients, find_resume_dir, gather_trainable_state,
                      load_full_state, load_train_state, lr_at, make_loggers, make_optimizer, make_strategy,
                      precision_args, prune_checkpoints, restore_rng_states, rng_states, seed_ranks)


QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")  # quantize.MODES
METRICS = ["step", "epoch", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "router_aux_loss",
           "sample"]


@dataclass
class DataArgs:
    train_files: str | list[str] = field(default_factory=list)  # JSON or JSONL: Alpaca, chat or ShareGPT records
    val_files: str | list[str] | None = None  # held-out records; when None, val_split of the train records
    val_split: float = 0.05  # fraction of the train records held out for validation (0: none) unless val_files
    prompt_style: str = "auto"  # chat_template, alpaca, or auto: the chat template when the tokenizer has one
    mask_prompt: bool = True  # learn only the assistant's text (and its end-of-turn token), not the prompt
    max_seq_length: int | None = None  # longer examples are cut (and dropped if no target is left); None: block_size
    packing: bool = False  # several examples per row of max_seq_length, each attending only to itself: no padding

    def __post_init__(self):
        require(0 <= self.val_split < 1, "--data.val_split", self.val_split, "a fraction in [0, 1)")
        require(self.max_seq_length is None or self.max_seq_length >= 2, "--data.max_seq_length",
                self.max_seq_length, "at least 2 tokens (a prompt token and a target) or null (block_size)")


@dataclass
class TrainArgs:
    global_batch_size: int = 16  # examples per optimizer step, all ranks together
    micro_batch_size: int = 4  # examples per forward pass on one rank
    epochs: int | None = 3  # passes over the training examples...
    max_steps: int | None = None  # ...or optimizer steps (the lower wins)...
    max_time: float | None = None  # ...or seconds of training (checkpoint and stop)
    lr: float = 2e-4
    min_lr: float = 2e-5  # cosine decays to this
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    seed: int = 1337

    def __post_init__(self):  # bad values fail while the flags are parsed, before any work
        for name in ("global_batch_size", "micro_batch_size", "epochs", "max_steps"):
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
    interval: int = 50  # validate and sample every this many steps (and at the end)
    max_batches: int | None = None  # micro-batches of the val set per rank and validation; None: all of it
    prompt: str = "Give three tips for staying healthy."  # sampled greedily at each validation, in the run's style
    max_new_tokens: int = 48

    def __post_init__(self):
        require(self.interval >= 1, "--eval.interval", self.interval, "steps >= 1")
        require(self.max_batches is None or self.max_batches >= 1, "--eval.max_batches", self.max_batches,
                "a positive integer or null (all)")
        require(self.max_new_tokens >= 1, "--eval.max_new_tokens", self.max_new_tokens, "a positive integer")


@dataclass
class CheckpointArgs:
    interval: int = 100  # save out_dir/step-XXXXXXXX every this many steps
    keep_last: int = 2  # how many step checkpoints to keep

    def __post_init__(self):
        require(self.interval >= 1, "--checkpoint.interval", self.interval, "steps >= 1")
        require(self.keep_last >= 1, "--checkpoint.keep_last", self.keep_last, "at least 1 (the newest)")


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: str | None = None,
    out_dir: Path = Path("out/finetune/lora"),
    resume: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    logger: str = "csv",
    fast_dev_run: bool = False,
) -> None:
    """Finetune a LoRA adapter on a frozen checkpoint with SFT data.

    Args:
        checkpoint_dir: the model to start from (model.safetensors, model_config.yaml, tokenizer files).
        data: the SFT files, prompt style and sequence length.
        train: batch sizes, stopping, optimizer and schedule.
        eval: validation interval and size, and the prompt sampled at each validation.
        checkpoint: checkpoint interval and retention.
        lora: rank, scaling, dropout and target projections of the adapter (rsLoRA, DoRA).
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8: quantise the frozen base (QLoRA).
        out_dir: where adapter checkpoints, metrics.csv and final/ go.
        resume: "auto" (the newest complete step checkpoint in out_dir, if any) or a step directory.
        devices: devices per node.
        num_nodes: nodes (SLURM sets the rest).
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed.
        strategy: auto (one device), ddp, or fsdp (FSDP2, fully_shard per Block).
        activation_checkpointing: recompute each Block in the backward pass to save memory.
        logger: csv (always written), plus tensorboard or wandb when named.
        fast_dev_run: a few steps with validation and a checkpoint, to smoke-test a config before a long run.
    """
    # before any work: a file in the way is the user's (never replaced), and final/ is not an input
    check_writable_directory(Path(out_dir) / "final", reads=[checkpoint_dir])
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InputError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    if quantize is not None and strategy == "fsdp":
        raise InputError("--quantize: FSDP cannot shard bitsandbytes layers; use --strategy ddp")
    if fast_dev_run:
        train.epochs, train.max_steps, train.max_time = None, 4, None
        eval.interval, eval.max_batches, checkpoint.interval = 2, 2, 4
    # The resolved arguments, stored in every checkpoint's metadata so that it says how it was made
    run_args = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, **precision_args(precision),
                      strategy=make_strategy(strategy, devices, num_nodes), loggers=make_loggers(logger, out_dir))
    fabric.launch()
    main(fabric, checkpoint_dir=Path(checkpoint_dir), data=data, train=train, eval=eval, ckpt=checkpoint, lora=lora,
         quantize=quantize, out_dir=Path(out_dir), resume=resume, precision=precision,
         activation_checkpointing=activation_checkpointing, run_args=run_args)
    for logger in fabric.loggers:  # TensorBoard writes out and closes its event file
        logger.finalize("success")


def main(fabric, *, checkpoint_dir: Path, data: DataArgs, train: TrainArgs, eval: EvalArgs, ckpt: CheckpointArgs,
         lora: LoRAConfig, quantize: str | None, out_dir: Path, resume: str | None, precision: str,
         activation_checkpointing: bool, run_args: dict) -> None:
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    world = fabric.world_size
    if train.global_batch_size % (train.micro_batch_size * world):
        raise InputError(f"--train.global_batch_size {train.global_batch_size} must be a multiple of "
                         f"micro_batch_size x world size = {train.micro_batch_size * world}")
    accum_steps = train.global_batch_size // (train.micro_batch_size * world)
    train_set, val_set = load_data(fabric, data, tokenizer, config.block_size, train.seed)
    if len(train_set) < train.global_batch_size:
        raise InputError(f"{len(train_set)} training examples, fewer than one --train.global_batch_size "
                         f"({train.global_batch_size})")
    sampler = StepSampler(len(train_set), train.global_batch_size, train.micro_batch_size, fabric.global_rank, world,
                          train.seed)
    limits = [s for s in (train.epochs and train.epochs * sampler.steps_per_epoch, train.max_steps) if s]
    if not limits:  # the cosine schedule needs an end; --train.max_time alone cannot give one
        raise InputError("set --train.epochs or --train.max_steps")
    max_steps = min(limits)
    prompt_ids = encode_prompt(eval.prompt, tokenizer, data.prompt_style)
    if len(prompt_ids) + eval.max_new_tokens > config.block_size:
        raise InputError(f"--eval.prompt is {len(prompt_ids)} tokens: with --eval.max_new_tokens "
                         f"{eval.max_new_tokens} that exceeds block_size {config.block_size}")

    fabric.seed_everything(train.seed)  # before add_lora: every rank draws the same initial A
    # On the CPU first: the strategy moves (or shards) it to the devices in setup_module. Quantised: each layer is
    # packed on the device it will run on (see quantize.py); 4-bit layers compute in the activations' dtype.
    model = load_model(checkpoint_dir, device=fabric.device if quantize else "cpu", dtype=weights_dtype(precision),
                       quantize=quantize)
    try:
        add_lora(model, lora)  # the targeted Linears become LoRALinear; only lora_* parameters train
    except ValueError as e:  # e.g. lm_head on a model with tied embeddings
        raise InputError(f"--lora.targets: {e}") from None
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    fabric.print(f"{config.name}{' ' + quantize if quantize else ''}: {lora_summary(model)}; "
                 f"{world} rank(s), {accum_steps} micro-batch(es) of {train.micro_batch_size} per rank and step, "
                 f"{max_steps} steps ({sampler.steps_per_epoch} per epoch)")
    seed_ranks(fabric, train.seed)  # the weights are made: from here on each rank draws its own dropout masks
    model = fabric.setup_module(model)
    raw_model = model.module  # unwrapped: its parameter names carry no wrapper prefix, in groups and checkpoints
    # after setup: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model, train.lr, train.weight_decay, train.betas,
                                                       fabric.device))

    state = dict(step=0, tokens=0, train_time=0.0)
    resume_dir = find_resume_dir(fabric, out_dir, resume)
    if resume_dir is not None:
        load_training_state(fabric, resume_dir, raw_model=raw_model, optimizer=optimizer, sampler=sampler, state=state)
        fabric.print(f"resumed from {resume_dir} at step {state['step']}")

    metrics = MetricsCSV(out_dir / "metrics.csv", METRICS, fabric.global_rank == 0, truncate_after_step=state["step"])
    progress = tqdm(total=max_steps, initial=state["step"], disable=fabric.global_rank != 0, desc="finetune",
                    dynamic_ncols=True)
    recent = deque(maxlen=10)  # (tokens, seconds) of the last steps' training, eval and checkpoints excluded
    stop_signal = StopSignal(fabric)
    for step in range(state["step"] + 1, max_steps + 1):
        last_step = step == max_steps
        lr = lr_at(step, train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        examples = [[train_set[i] for i in ids] for ids in sampler.next_step()]
        micro_batches = make_micro_batches(fabric, examples, train_set.pad_id,
                                           (data.max_seq_length or config.block_size) if data.packing else None)
        train_loss, aux_loss = step_loss(fabric, model, micro_batches, raw_model.config.router_aux_loss_coef)
        if not math.isfinite(train_loss):
            raise InputError(f"loss is {train_loss} at step {step}; the last good checkpoint in {out_dir} is "
                             "kept (try a lower --train.lr or --train.grad_clip)")
        if train.grad_clip:
            clip_gradients(fabric, model, optimizer, train.grad_clip, step, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # input tokens of the step on all ranks, padding excluded
        step_tokens = int(fabric.all_reduce(torch.tensor(sum(len(x["input_ids"]) for e in examples for x in e),
                                                         device=fabric.device), reduce_op="sum").item())
        step_time = time.perf_counter() - step_start
        state["step"] = step
        state["tokens"] += step_tokens
        state["train_time"] += step_time
        recent.append((step_tokens, step_time))
        # tokens over the elapsed training time of the last steps
        tokens_per_sec = sum(t for t, _ in recent) / sum(s for _, s in recent)
        row = dict(step=step, epoch=round(sampler.epochs_done, 4), tokens=state["tokens"], train_loss=train_loss,
                   val_loss=None, lr=lr, tokens_per_sec=tokens_per_sec, router_aux_loss=aux_loss, sample=None)
        if step % eval.interval == 0 or last_step:
            if len(val_set):
                row["val_loss"] = validate(fabric, model, val_set, train.micro_batch_size, eval.max_batches)
            row["sample"] = generate_sample(fabric, raw_model, tokenizer, prompt_ids, eval.max_new_tokens)
            if fabric.global_rank == 0:
                tqdm.write(f"step {step}: {eval.prompt!r} -> {row['sample']!r}")
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{row['val_loss']:.3f}"} if row["val_loss"] else {}),
                             tok_s=f"{tokens_per_sec:,.0f}")
        metrics.log(row)
        fabric.log_dict({k: v for k, v in row.items() if v is not None and k != "sample"}, step=step)

        out_of_time = train.max_time is not None and state["train_time"] >= train.max_time
        stop = stop_signal.requested()
        if step % ckpt.interval == 0 or last_step or out_of_time or stop:
            save_checkpoint_dir(fabric, out_dir / f"step-{step:08d}", raw_model=raw_model, optimizer=optimizer,
                                sampler=sampler, state=state, lora=lora, base_dir=checkpoint_dir,
                                run_args=run_args, with_state=True)
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

    save_checkpoint_dir(fabric, out_dir / "final", raw_model=raw_model, optimizer=optimizer, sampler=sampler,
                        state=state, lora=lora, base_dir=checkpoint_dir, run_args=run_args, with_state=False)
    fabric.print(f"final checkpoint: {out_dir / 'final'}")
    write_run_report(out_dir, enabled=fabric.global_rank == 0)  # out_dir/report.png: the run's metrics drawn
    if fabric.device.type == "cuda":
        fabric.print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(fabric.device) / 2**30:.2f} GiB")


def step_loss(fabric, model, micro_batches: list[dict], aux_coef: float) -> tuple[float, float | None]:
    """Forward and backward over this rank's micro-batches of one optimizer step, leaving the step's gradient in
    .grad. Returns the step's loss per target token over all ranks, and an MoE model's load-balancing loss (the mean
    over micro-batches and ranks; None for a dense model), which aux_coef times joins the gradient."""
    n_targets = fabric.all_reduce(torch.tensor(sum(count_targets(b) for b in micro_batches), device=fabric.device),
                                  reduce_op="sum").item()
    loss_sum, aux_sum = torch.zeros((), device=fabric.device), None
    for i, batch in enumerate(micro_batches):
        x, y = batch["input_ids"].to(fabric.device), batch["labels"].to(fabric.device)
        doc_ids = batch["doc_ids"].to(fabric.device) if "doc_ids" in batch else None  # packed rows
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            # Examples differ in length and in how much of them is prompt, so a mean per micro-batch divided by the
            # number of micro-batches would weigh each target by 1 / (targets in its micro-batch). Instead: the sum
            # over this micro-batch's targets divided by the targets of the whole step (every micro-batch of every
            # rank, all-reduced above), so every target weighs the same, as in one big batch. x world size because
            # DDP and FSDP average the gradients of the ranks, and the step's loss is their sum.
            loss = model(x, targets=y, doc_ids=doc_ids) * fabric.world_size / n_targets  # IGNORE_INDEX: nothing
            aux = router_aux_loss(model)  # per micro-batch, averaged over them here and over the ranks by DDP
            if aux is not None:
                aux = aux / len(micro_batches)
                aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
            fabric.backward(loss if aux is None else loss + aux_coef * aux)
        loss_sum += loss.detach()
    aux_mean = None if aux_sum is None else fabric.all_reduce(aux_sum, reduce_op="mean").item()
    return fabric.all_reduce(loss_sum, reduce_op="mean").item(), aux_mean


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


@torch.no_grad()
def validate(fabric, model, val_set, micro_batch_size: int, max_batches: int | None) -> float:
    """The loss per target token of the val set (or of its first max_batches micro-batches per rank), all ranks."""
    model.eval()
    chunks = [list(range(i, min(i + micro_batch_size, len(val_set)))) for i in range(0, len(val_set), micro_batch_size)]
    # The same number of forward passes on every rank: under FSDP each one is a collective that all ranks must join
    n_batches = min(-(-len(chunks) // fabric.world_size), max_batches or len(chunks))
    sums = torch.zeros(2, device=fabric.device)  # (loss summed over targets, targets)
    for ids in (chunks[fabric.global_rank::fabric.world_size] + [[]] * n_batches)[:n_batches]:
        batch = collate([val_set[i] for i in ids or [0]], val_set.pad_id)
        if not ids:  # this rank has run out of val examples: a batch whose targets are all masked keeps it in step
            batch["labels"].fill_(IGNORE_INDEX)
        y = batch["labels"].to(fabric.device)
        loss = model(batch["input_ids"].to(fabric.device), targets=y)
        sums += torch.stack([loss, (y != IGNORE_INDEX).sum().float()])
    model.train()
    sums = fabric.all_reduce(sums, reduce_op="sum")
    return (sums[0] / sums[1]).item()


def generate_sample(fabric, raw_model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy answer to the eval prompt. Every rank generates: under FSDP each forward is a collective."""
    raw_model.eval()
    with fabric.autocast():
        ids = generate(raw_model, [prompt_ids], max_new_tokens, stop_ids=tokenizer.stop_ids, temperature=0.0)[0]
    raw_model.clear_kv_cache()  # training runs without a cache
    raw_model.train()
    return tokenizer.decode(ids, skip_special_tokens=True)


def load_data(fabric, data: DataArgs, tokenizer: Tokenizer, block_size: int, seed: int):
    if not data.train_files:
        raise InputError("--data.train_files: name the JSON or JSONL files to train on")
    max_seq_length = data.max_seq_length or block_size
    if max_seq_length > block_size:
        raise InputError(f"--data.max_seq_length {max_seq_length} exceeds the model's block_size {block_size}")
    train_set, val_set, stats = load_sft_data(
        data.train_files, tokenizer, prompt_style=data.prompt_style, mask_prompt=data.mask_prompt,
        max_seq_length=max_seq_length, val_split=0.0 if data.val_files else data.val_split, val_paths=data.val_files,
        seed=seed)
    fabric.print(f"{stats['train']:,} train and {stats['val']:,} val examples, prompt style "
                 f"{resolve_style(tokenizer, data.prompt_style)}; {stats['train_targets']:,} of the "
                 f"{stats['train_tokens']:,} train tokens are targets; {stats['truncated']:,} example(s) truncated to "
                 f"{max_seq_length} tokens, {stats['dropped']:,} dropped (no target left after truncation)")
    return train_set, val_set


def save_checkpoint_dir(fabric, path: Path, *, raw_model, optimizer, sampler: StepSampler, state: dict,
                        lora: LoRAConfig, base_dir: Path, run_args: dict, with_state: bool) -> None:
    """An adapter directory (lora.safetensors + lora_config.yaml naming the base + tokenizer) that generate.py and
    convert/merge_lora.py read, plus state/ to resume. Only the adapter is gathered and saved, under FSDP too."""
    model_state, optim_state = gather_trainable_state(raw_model, optimizer, with_optimizer=with_state)
    # is_lora_key: a quantised base's layers also write their quantisation state (weight.absmax, ...) to state dicts
    model_state = {k: v for k, v in model_state.items() if is_lora_key(k)}
    rng = rng_states(fabric)  # a collective: every rank
    if fabric.global_rank == 0:
        train_state = dict(optimizer=optim_state, sampler=sampler.state_dict(), **rng, **state)
        metadata = dict(script=Path(__file__).name, step=state["step"], args=json.dumps(run_args, default=str))
        save_lora(path, lora, model_state, base_dir, tokenizer_dir=base_dir, metadata=metadata,
                  train_state=train_state if with_state else None)
    fabric.barrier()


def load_training_state(fabric, path: Path, *, raw_model, optimizer, sampler: StepSampler, state: dict) -> None:
    saved = load_train_state(path)
    adapter = load_state_dict(path / LORA_WEIGHTS)
    check_state_dict(raw_model, adapter, path / LORA_WEIGHTS, lora=True)  # a step checkpoint of another --lora
    # strict=False: the file holds the adapter only; the frozen base came from checkpoint_dir
    load_full_state(raw_model, optimizer, adapter, saved["optimizer"], strict=False)
    sampler.load_state_dict(saved["sampler"])
    restore_rng_states(fabric, saved, sampler.seed)
    state.update(step=saved["step"], tokens=saved["tokens"], train_time=saved["train_time"])


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(setup, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
