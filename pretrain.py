"""Pretrain a GPT on litdata token chunks (from scratch, or continued from a converted checkpoint).

    python -m data_prep.prepare_stdlib && python pretrain.py --config config_hub/stdlib.yaml   # 1 CPU, minutes
    python pretrain.py --config config_hub/tinyllama.yaml --devices 1                          # 1 GPU
    python pretrain.py --config config_hub/tinyllama.yaml --devices 8 --strategy fsdp          # 8 GPUs, FSDP2
    sbatch config_hub/slurm/pretrain.sbatch                                                    # N nodes

Every flag overrides the YAML (`--train.lr 1e-3`); `--print_config` shows the result. A run writes
out_dir/step-XXXXXXXX/ checkpoints (weights + state/ to resume), out_dir/final/, and out_dir/metrics.csv.
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
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, TokensLoader
from tqdm import tqdm

from checkpoint import (check_state_dict, check_writable_directory, load_config, load_state_dict, read_chunk_index,
                        require, save_checkpoint)
from model import GPT, Block, Config, InputError, name_to_config, router_aux_loss
from report import write_run_report
from tokenizer import Tokenizer
from training import (MetricsCSV, StopSignal, clip_gradients, device_peak_flops, find_resume_dir, flops_per_token_of,
                      gather_full_state, load_full_state, load_train_state, lr_at, make_loggers, make_optimizer,
                      make_strategy, precision_args, prune_checkpoints, restore_rng_states, rng_states, seed_ranks)


METRICS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "mfu", "router_aux_loss"]


@dataclass
class ModelArgs:
    name: str = "stdlib-llama-6m"  # a preset of model.py
    overrides: dict = field(default_factory=dict)  # Config fields to change, e.g. {n_layer: 4}

    def __post_init__(self):  # an unknown preset or field, or a value of the wrong type: before any work
        try:
            Config.from_name(self.name, **self.overrides)
        except InputError as e:
            unknown_preset = self.name not in name_to_config
            flag = f"--model.name {self.name}" if unknown_preset else f"--model.overrides {self.overrides}"
            raise InputError(f"{flag}: {e}") from None


@dataclass
class DataArgs:
    train_dirs: list[str] = field(default_factory=lambda: ["data/stdlib/train"])  # litdata chunk directories
    weights: list[float] | None = None  # sampling weight of each train dir (a mixture); None = equal
    val_dir: str | None = "data/stdlib/val"
    num_workers: int = 1  # loader processes per rank
    shuffle: bool = True
    # attention confined to each document of a block (bos/eos boundaries, positions restarting), as Llama 3 trains
    document_mask: bool = False

    def __post_init__(self):
        fits = self.weights is None or (len(self.weights) == len(self.train_dirs) and all(w > 0 for w in self.weights))
        require(fits, "--data.weights", self.weights,
                f"one positive weight per train dir ({len(self.train_dirs)}) or null")
        require(self.num_workers >= 0, "--data.num_workers", self.num_workers, "0 (the main process) or more")


@dataclass
class TrainArgs:
    global_batch_size: int = 16  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_tokens: int | None = None  # stop after this many training tokens...
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
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    out_dir: Path = Path("out/pretrain/stdlib"),
    tokenizer_dir: Path | None = Path("checkpoints/stdlib-tokenizer"),
    initial_checkpoint_dir: Path | None = None,
    resume: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    logger: str = "csv",
    peak_flops: float | None = None,
    fast_dev_run: bool = False,
) -> None:
    """Pretrain a model from model.py on litdata token chunks.

    Args:
        model: the preset and field overrides.
        data: chunk directories and loader settings.
        train: batch sizes, stopping, optimizer and schedule.
        eval: validation interval and size.
        checkpoint: checkpoint interval and retention.
        out_dir: where checkpoints, metrics.csv and final/ go.
        tokenizer_dir: tokenizer files copied into every checkpoint (so generate.py can read it).
        initial_checkpoint_dir: start from these weights (continued pretraining); its config wins over `model`.
        resume: "auto" (the newest complete step checkpoint in out_dir, if any) or a step directory.
        devices: devices per node.
        num_nodes: nodes (SLURM sets the rest).
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed.
        strategy: auto (one device), ddp, or fsdp (FSDP2, fully_shard per Block).
        activation_checkpointing: recompute each Block in the backward pass to save memory.
        compile: torch.compile the model.
        logger: csv (always written), plus tensorboard or wandb when named.
        peak_flops: the device's peak FLOP/s for MFU; default: a data-sheet table for GPUs; on a CPU the larger of a
            measured matmul and the nominal cores x clock x FLOPs per cycle (training.device_peak_flops).
        fast_dev_run: a few steps with validation and a checkpoint, to smoke-test a config before a long run.
    """
    # before any work: a file in the way is the user's (never replaced), and final/ is not an input
    check_writable_directory(Path(out_dir) / "final", reads=[initial_checkpoint_dir, tokenizer_dir])
    if fast_dev_run:
        train.max_steps, train.max_tokens, train.max_time = 4, None, None
        eval.interval, eval.max_batches, checkpoint.interval = 2, 2, 4
    # The resolved arguments, stored in every checkpoint's metadata so that it says how it was made
    run_args = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, **precision_args(precision),
                      strategy=make_strategy(strategy, devices, num_nodes), loggers=make_loggers(logger, out_dir))
    fabric.launch()
    main(fabric, model_args=model, data=data, train=train, eval=eval, ckpt=checkpoint, out_dir=Path(out_dir),
         tokenizer_dir=tokenizer_dir, initial_checkpoint_dir=initial_checkpoint_dir, resume=resume,
         activation_checkpointing=activation_checkpointing, compile=compile, precision=precision,
         peak_flops=peak_flops, run_args=run_args)
    for logger in fabric.loggers:  # TensorBoard writes out and closes its event file
        logger.finalize("success")


def main(fabric, *, model_args: ModelArgs, data: DataArgs, train: TrainArgs, eval: EvalArgs, ckpt: CheckpointArgs,
         out_dir: Path, tokenizer_dir: Path | None, initial_checkpoint_dir: Path | None, resume: str | None,
         activation_checkpointing: bool, compile: bool, precision: str, peak_flops: float | None,
         run_args: dict) -> None:
    if initial_checkpoint_dir is not None:
        config = load_config(initial_checkpoint_dir)
    else:
        config = Config.from_name(model_args.name, **model_args.overrides)  # checked by ModelArgs
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
    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    tokenizer_vocab = tokenizer.vocab_size if tokenizer is not None else 0
    boundaries = None  # (bos, eos) ids that separate the documents of a block, with --data.document_mask
    if data.document_mask:
        if tokenizer is None or tokenizer.bos_id is None and tokenizer.eos_id is None:
            raise InputError("--data.document_mask needs --tokenizer_dir with a bos or eos token: they mark where "
                             "the documents of a block begin and end")
        boundaries = (tokenizer.bos_id, tokenizer.eos_id)
    if tokenizer_vocab > config.vocab_size:
        raise InputError(f"{tokenizer_dir}: the tokenizer has {tokenizer_vocab} tokens, "
                         f"more than the model's vocab_size {config.vocab_size}")

    fabric.seed_everything(train.seed)
    train_loader, val_loader = make_loaders(fabric, data, config, train.micro_batch_size, train.seed)

    with fabric.init_module():  # the same seed on every rank: identical weights before sharding or DDP
        model = GPT(config)
    if initial_checkpoint_dir is not None:
        weights = Path(initial_checkpoint_dir) / "model.safetensors"
        state_dict = load_state_dict(weights)
        check_state_dict(model, state_dict, weights)  # a clear line, not load_state_dict's list of size mismatches
        model.load_state_dict(state_dict)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    fabric.print(f"{config.name}: {sum(p.numel() for p in model.parameters()):,} parameters, {world} rank(s), "
                 f"{accum_steps} micro-batch(es) of {train.micro_batch_size} x {config.block_size} per rank and step")
    seed_ranks(fabric, train.seed)  # the weights are made: from here on each rank draws its own dropout masks
    model = fabric.setup_module(model)
    raw_model = model.module  # unwrapped: its parameter names carry no wrapper prefix, in groups and checkpoints
    # after setup: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model, train.lr, train.weight_decay, train.betas,
                                                       fabric.device))
    forward = torch.compile(model) if compile else model

    state = dict(step=0, tokens=0, train_time=0.0)
    resume_dir = find_resume_dir(fabric, out_dir, resume)
    if resume_dir is not None:
        load_training_state(fabric, resume_dir, raw_model=raw_model, optimizer=optimizer, train_loader=train_loader,
                            state=state, seed=train.seed)
        fabric.print(f"resumed from {resume_dir} at step {state['step']}")

    flops_per_token = flops_per_token_of(raw_model, config, config.block_size)
    peak, source = (peak_flops, "--peak_flops") if peak_flops else device_peak_flops(fabric.device, precision)
    fabric.print(f"MFU against a peak of {peak / 1e12:,.3f} TFLOP/s per device ({source})" if peak
                 else f"no MFU: {source}")
    metrics = MetricsCSV(out_dir / "metrics.csv", METRICS, fabric.global_rank == 0, truncate_after_step=state["step"])
    train_iter = batches_forever(train_loader)
    progress = tqdm(total=max_steps, initial=state["step"], disable=fabric.global_rank != 0, desc="pretrain",
                    dynamic_ncols=True)
    recent = deque(maxlen=10)  # (tokens, seconds) of the last steps' training, eval and checkpoints excluded
    stop_signal = StopSignal(fabric)
    for step in range(state["step"] + 1, max_steps + 1):
        last_step = step == max_steps
        lr = lr_at(step, train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        loss_sum, aux_sum = torch.zeros((), device=fabric.device), None
        for micro in range(accum_steps):
            batch = next(train_iter)
            x, y = batch[:, :-1].to(fabric.device), batch[:, 1:].to(fabric.device).long()
            doc_ids = document_ids(x, *boundaries) if boundaries else None
            with fabric.no_backward_sync(model, enabled=micro < accum_steps - 1):
                # Full blocks, every token a target: the mean per micro-batch divided by the number of
                # micro-batches is the mean over the whole optimizer step. With document masks too: a document's
                # last token (eos) still has the next one's first (bos) as its target, which it learns to predict.
                loss = forward(x, targets=y, doc_ids=doc_ids) / y.numel() / accum_steps
                aux = router_aux_loss(raw_model)  # an MoE model's load-balancing loss; None for a dense one
                if aux is not None:
                    aux = aux / accum_steps
                    aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
                fabric.backward(loss if aux is None else loss + config.router_aux_loss_coef * aux)
            loss_sum += loss.detach()
        train_loss = fabric.all_reduce(loss_sum, reduce_op="mean").item()
        aux_loss = None if aux_sum is None else fabric.all_reduce(aux_sum, reduce_op="mean").item()
        if not math.isfinite(train_loss):
            raise InputError(f"loss is {train_loss} at step {step}; the last good checkpoint in {out_dir} is "
                             "kept (try a lower --train.lr or --train.grad_clip)")
        if train.grad_clip:
            clip_gradients(fabric, model, optimizer, train.grad_clip, step, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_time = time.perf_counter() - step_start
        state["step"] = step
        state["tokens"] += train.global_batch_size * config.block_size
        state["train_time"] += step_time
        recent.append((train.global_batch_size * config.block_size, step_time))
        # tokens over the elapsed training time of the last steps (not one step's timestamp)
        tokens_per_sec = sum(t for t, _ in recent) / sum(s for _, s in recent)
        row = dict(step=step, tokens=state["tokens"], train_loss=train_loss, val_loss=None, lr=lr,
                   tokens_per_sec=tokens_per_sec, router_aux_loss=aux_loss,
                   mfu=tokens_per_sec * flops_per_token / (peak * fabric.world_size) if peak else None)
        if val_loader is not None and (step % eval.interval == 0 or last_step):
            row["val_loss"] = validate(fabric, forward, val_loader, eval.max_batches, boundaries)
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{row['val_loss']:.3f}"} if row["val_loss"] else {}),
                             tok_s=f"{tokens_per_sec:,.0f}")
        metrics.log(row)
        fabric.log_dict({k: v for k, v in row.items() if v is not None}, step=step)

        out_of_time = train.max_time is not None and state["train_time"] >= train.max_time
        stop = stop_signal.requested()
        if step % ckpt.interval == 0 or last_step or out_of_time or stop:
            save_checkpoint_dir(fabric, out_dir / f"step-{step:08d}", raw_model=raw_model, optimizer=optimizer,
                                train_loader=train_loader, state=state, config=config, tokenizer_dir=tokenizer_dir,
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

    save_checkpoint_dir(fabric, out_dir / "final", raw_model=raw_model, optimizer=optimizer, train_loader=train_loader,
                        state=state, config=config, tokenizer_dir=tokenizer_dir, run_args=run_args, with_state=False)
    fabric.print(f"final checkpoint: {out_dir / 'final'}")
    write_run_report(out_dir, enabled=fabric.global_rank == 0)  # out_dir/report.png: the run's metrics drawn


def batches_forever(loader):
    # Each pass over a loader is one epoch (reshuffled by epoch number). After load_state_dict the first pass
    # continues the interrupted epoch where it stopped, so resume never replays batches.
    while True:
        yield from loader


def document_ids(tokens: torch.Tensor, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """(B, T) token ids of blocks -> (B, T) document ids for model(doc_ids=): a document begins at each bos and after
    each eos (prepare_text writes every document as bos ... eos; a block cuts through them anywhere)."""
    starts = tokens == bos_id if bos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
    if eos_id is not None:
        starts[:, 1:] |= tokens[:, :-1] == eos_id
    return starts.cumsum(dim=1)


@torch.no_grad()
def validate(fabric, forward, val_loader, max_batches: int, boundaries: tuple | None) -> float:
    forward.eval()
    losses = []
    for i, batch in enumerate(val_loader):
        if i >= max_batches:
            break
        x, y = batch[:, :-1].to(fabric.device), batch[:, 1:].to(fabric.device).long()
        doc_ids = document_ids(x, *boundaries) if boundaries else None
        losses.append(forward(x, targets=y, doc_ids=doc_ids) / y.numel())
    forward.train()
    return fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()


def make_loaders(fabric, data: DataArgs, config: Config, micro_batch_size: int, seed: int):
    for d in data.train_dirs + ([data.val_dir] if data.val_dir else []):
        read_chunk_index(d)
    # block_size + 1 tokens per sample: inputs and the targets shifted by one. One TokensLoader per dataset:
    # it caches chunk buffers by chunk index, and two splits both have a chunk 0.
    # item_shuffle_window 0: each chunk's samples in a full permutation. litdata's default since 0.2.74 shuffles
    # aligned runs of 256 consecutive samples, one run after another: in the default job a run (66k consecutive
    # tokens, one or a few files) fills 16 steps, and the loss curve turns to saw teeth.
    datasets = [StreamingDataset(d, item_loader=TokensLoader(block_size=config.block_size + 1), shuffle=data.shuffle,
                                 drop_last=True, seed=seed, item_shuffle_window=0) for d in data.train_dirs]
    for d, ds in zip(data.train_dirs, datasets):
        if len(ds) < micro_batch_size * fabric.world_size:
            raise InputError(f"{d}: {len(ds)} samples of block_size+1 = {config.block_size + 1} tokens, fewer than "
                             f"one micro-batch per rank; use more data or a smaller block_size")
    train_set = datasets[0] if len(datasets) == 1 else CombinedStreamingDataset(
        datasets, seed=seed, weights=data.weights, iterate_over_all=False)
    train_loader = StreamingDataLoader(train_set, batch_size=micro_batch_size, num_workers=data.num_workers,
                                       drop_last=True)
    val_loader = None
    if data.val_dir:
        val_set = StreamingDataset(data.val_dir, item_loader=TokensLoader(block_size=config.block_size + 1),
                                   shuffle=False, drop_last=True)
        if len(val_set) >= micro_batch_size * fabric.world_size:
            val_loader = StreamingDataLoader(val_set, batch_size=micro_batch_size, num_workers=0, drop_last=True)
        else:
            fabric.print(f"warning: {data.val_dir} holds less than one micro-batch per rank; no validation")
    return train_loader, val_loader


def save_checkpoint_dir(fabric, path: Path, *, raw_model, optimizer, train_loader, state: dict, config: Config,
                        tokenizer_dir: Path | None, run_args: dict, with_state: bool) -> None:
    """A checkpoint directory (full weights + config + tokenizer) that every script reads, plus state/ to resume."""
    model_state, optim_state = gather_full_state(raw_model, optimizer, with_optimizer=with_state)
    loader_state = train_loader.state_dict() if with_state else None
    rng = rng_states(fabric)  # a collective: every rank
    if fabric.global_rank == 0:
        train_state = dict(optimizer=optim_state, train_loader=loader_state, **rng, **state)
        metadata = dict(script=Path(__file__).name, step=state["step"], args=json.dumps(run_args, default=str))
        save_checkpoint(path, config, model_state, tokenizer_dir, metadata=metadata,
                        train_state=train_state if with_state else None)
    fabric.barrier()


def load_training_state(fabric, path: Path, *, raw_model, optimizer, train_loader, state: dict, seed: int) -> None:
    saved = load_train_state(path)
    weights = load_state_dict(path / "model.safetensors")
    check_state_dict(raw_model, weights, path / "model.safetensors")  # a checkpoint of another model config
    load_full_state(raw_model, optimizer, weights, saved["optimizer"])
    train_loader.load_state_dict(saved["train_loader"])
    restore_rng_states(fabric, saved, seed)
    state.update(step=saved["step"], tokens=saved["tokens"], train_time=saved["train_time"])


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(setup, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
