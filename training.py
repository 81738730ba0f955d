"""What every training script (pretrain, finetune_full, finetune_lora, distill) sets up the same way: the Fabric
strategy and loggers, the optimizer and its schedule, metrics.csv, step checkpoints and resuming, MFU.
Each training loop itself stays in its script, where it can be read and edited.
"""

import csv
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import CheckpointError
from model import GPT, Config


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0, then cosine from lr down to min_lr at max_steps."""
    if step <= warmup_steps:
        return lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device: torch.device):
    """AdamW over the trainable parameters. No weight decay on norms, biases and embeddings: the 1-D
    parameters and the embedding table."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in named if p.dim() < 2 or n.startswith("embed.")]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel over all parameters; on a 2-core CPU the step of a 14M model takes 22 ms instead of 84
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))


def make_strategy(name: str, devices: int | str, num_nodes: int):
    if name == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy
        # pure data parallelism over every device (Lightning's "auto" would make the devices of a node a TP group)
        per_node = devices if isinstance(devices, int) else max(torch.cuda.device_count(), 1)
        return ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=per_node * num_nodes,
                                     tensor_parallel_size=1, save_distributed_checkpoint=False)
    if name in ("auto", "ddp"):
        return name
    raise CheckpointError(f"--strategy {name!r}: expected auto, ddp or fsdp")


def shard_blocks(model: GPT, device_mesh) -> GPT:
    """FSDP2: every Block its own shard group, then the rest (embedding, final norm, head) at the root."""
    from torch.distributed.fsdp import fully_shard
    mesh = device_mesh["data_parallel"]
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_loggers(name: str, out_dir: Path, project: str = "gptkit"):
    if name == "csv":
        return []  # metrics.csv is always written by MetricsCSV
    if name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger
        return [TensorBoardLogger(root_dir=out_dir, name="tensorboard")]
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        return [WandbLogger(save_dir=out_dir, project=project)]
    raise CheckpointError(f"--logger {name!r}: expected csv, tensorboard or wandb")


class StopSignal:
    """SIGUSR1 asks the run to stop cleanly: SLURM sends it ahead of the time limit (`#SBATCH
    --signal=SIGUSR1@120` in config_hub/slurm/pretrain.sbatch), where its default action would kill the job with
    nothing saved. The handler only sets a flag; the loop checks it between optimizer steps, writes a checkpoint
    there and, inside a SLURM job, requeues the job so that `--resume auto` continues it."""

    def __init__(self, fabric):
        self.fabric, self.received = fabric, False
        signal.signal(signal.SIGUSR1, self._receive)

    def _receive(self, signum, frame) -> None:
        self.received = True

    def requested(self) -> bool:
        # each rank gets the signal at its own moment: all stop after the same step once any rank has it
        return self.fabric.strategy.reduce_boolean_decision(self.received, all=False)

    def requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if "SLURM_ARRAY_JOB_ID" in os.environ:  # an array task is requeued by its array id and index
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if job is None or self.fabric.global_rank != 0:
            return
        if shutil.which("scontrol") is None:
            self.fabric.print(f"SLURM job {job}: no scontrol on PATH to requeue it; resubmit with --resume auto")
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        self.fabric.print(f"requeued SLURM job {job}" if result.returncode == 0
                          else f"`scontrol requeue {job}` failed: {result.stderr.strip()}")


class MetricsCSV:
    """out_dir/metrics.csv, one row per step. On resume the rows after the resumed step (written by the run
    that was killed) are dropped, so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, columns: list[str], enabled: bool, truncate_after_step: int):
        self.path, self.columns, self.enabled = path, columns, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.is_file() and truncate_after_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= truncate_after_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow({k: "" if v is None else v for k, v in row.items()})


def gather_full_state(raw_model: nn.Module, optimizer, with_optimizer: bool) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state dicts on the CPU, identical whatever the strategy: under
    FSDP2 the shards are gathered, so a run can resume on a different number of devices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(raw_model, options=options)
    optim_state = get_optimizer_state_dict(raw_model, optimizer, options=options) if with_optimizer else None
    return model_state, optim_state


def load_full_state(raw_model: nn.Module, optimizer, model_state: dict, optim_state: dict, strict: bool = True):
    """The inverse of gather_full_state: full tensors scattered to however the model is wrapped now."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(raw_model, model_state, options=options)
    set_optimizer_state_dict(raw_model, optimizer, optim_state, options=options)


def load_train_state(path: Path) -> dict:
    file = Path(path) / "state" / "train_state.pt"
    return torch.load(file, weights_only=True)  # our own format, read without unpickling code


def find_resume_dir(out_dir: Path, resume: str | None) -> Path | None:
    """--resume auto: the newest complete step checkpoint (a half-written one still has its temporary name,
    so it is never picked); --resume PATH: that one."""
    if resume is None:
        return None
    if resume != "auto":
        if not (Path(resume) / "state" / "train_state.pt").is_file():
            raise CheckpointError(f"--resume {resume}: not a step checkpoint (state/train_state.pt missing)")
        return Path(resume)
    steps = sorted(p for p in out_dir.glob("step-*") if (p / "state" / "train_state.pt").is_file())
    return steps[-1] if steps else None


def prune_checkpoints(fabric, out_dir: Path, keep_last: int) -> None:
    if fabric.global_rank == 0:
        for old in sorted(out_dir.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)


def flops_per_token_of(model: GPT, config: Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention's
    12 * n_layer * n_embd * T. The input embedding is a lookup, not a matmul, unless tied to the head."""
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_embeddings:
        params -= config.vocab_size * config.n_embd
    return 6 * params + 12 * config.n_layer * config.n_embd * seq_len


def device_peak_flops(device: torch.device, precision) -> float | None:
    """The device's peak FLOP/s in the training precision: a table for GPUs, a measured matmul on CPU."""
    low_precision = "bf16" in str(getattr(precision, "precision", "")) or "16" in type(precision).__name__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
        peak = next((v for k, v in table.items() if k in name), None)
        return peak if peak is None or low_precision else peak / 16  # tf32-less fp32 runs at about 1/16
    if device.type == "cpu":
        # The practical peak: the best of a few 2048^3 matmuls (BENCH.md's reference measurement)
        a = torch.randn(2048, 2048, dtype=torch.bfloat16 if low_precision else torch.float32)
        a @ a  # warm up
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        return 2 * 2048**3 / best
    return None


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype to load a checkpoint's weights in for a Fabric precision: a "-true" half precision trains in that
    dtype; 32-true and the mixed precisions keep float32 weights (autocast lowers the matmuls)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(precision,
                                                                                                 torch.float32)


def gather_trainable_state(raw_model: nn.Module, optimizer, with_optimizer: bool) -> tuple[dict, dict | None]:
    """gather_full_state for the parameters that train (a LoRA adapter): the frozen base is neither gathered nor
    copied, so under FSDP a checkpoint costs the adapter's size, not the model's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    for module in raw_model.modules():
        if isinstance(module, FSDPModule):
            # FSDP2 keeps the root's parameters unsharded after a forward with no backward (validation, sampling):
            # register the sharded ones again, which the optimizer holds (get_model_state_dict's hooks do this)
            module.reshard()
    # From named_parameters, not get_model_state_dict: that walks every state dict key as an attribute path, and
    # bitsandbytes' int8 layers write keys that are not attributes (SCB, weight_format)
    model_state = {}
    for name, p in raw_model.named_parameters():
        if p.requires_grad:  # in the same order on every rank: full_tensor() is a collective
            full = p.full_tensor() if isinstance(p, DTensor) else p
            model_state[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().cpu()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    optim_state = get_optimizer_state_dict(raw_model, optimizer, options=options) if with_optimizer else None
    return model_state, optim_state


class StepSampler:
    """Which examples each optimizer step trains on, for a dataset held in memory (SFT): a permutation per epoch
    seeded by (seed, epoch), cut into global batches (a last partial one is dropped), each cut into micro-batches of
    which rank r takes numbers r, r + world_size, ... A step sees the same examples whatever the world size. The
    position is (epoch, examples used in it): saved in state/, it lets a resumed run continue the same order."""

    def __init__(self, n_examples: int, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.n, self.global_batch_size, self.micro_batch_size = n_examples, global_batch_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = n_examples // global_batch_size
        self.epoch, self.position = 0, 0
        self._order = (None, None)  # (epoch, permutation) of the epoch in progress

    def next_step(self) -> list[list[int]]:
        """The example indices of this rank's micro-batches of the next optimizer step."""
        if self.position + self.global_batch_size > self.n:  # this epoch has no full global batch left
            self.epoch, self.position = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(self.n, generator=generator).tolist())
        batch = self._order[1][self.position:self.position + self.global_batch_size]
        self.position += self.global_batch_size
        micro = [batch[i:i + self.micro_batch_size] for i in range(0, len(batch), self.micro_batch_size)]
        return micro[self.rank::self.world_size]

    @property
    def epochs_done(self) -> float:
        """Epochs completed, with the fraction of the current one."""
        return self.epoch + self.position / (self.steps_per_epoch * self.global_batch_size)

    def state_dict(self) -> dict:
        return dict(seed=self.seed, epoch=self.epoch, position=self.position)

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise CheckpointError(f"the checkpoint's data order was drawn with --train.seed {state['seed']}, "
                                  f"not {self.seed}; resume with the same seed")
        self.epoch, self.position = state["epoch"], state["position"]
