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
from lightning.fabric.plugins.precision import HalfPrecision

from checkpoint import remove_stale_temporaries, weights_dtype
from model import Config, GPT, InputError, is_lora_key



def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0, then cosine from lr down to min_lr at max_steps."""
    if step <= warmup_steps:
        return lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device: torch.device):
    """AdamW over the trainable parameters. No weight decay on norms, biases and embeddings: the 1-D
    parameters and the embedding table. Half-precision weights (bf16-true, 16-true) get CompensatedAdamW, whose
    updates are not lost to rounding; float32 ones torch's fused AdamW."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in named if p.dim() < 2 or n.startswith("embed.")]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named):
        return CompensatedAdamW(groups, lr=lr, betas=tuple(betas))
    # fused: one kernel over all parameters; many times faster than the per-tensor loop on a CPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW for bf16 or fp16 weights that loses none of its small updates.

    Plain AdamW on bf16 weights rounds each new weight to 8 bits of mantissa, so an update smaller than half a
    rounding step (lr 2e-5 against a weight of 0.05 is 1/50 of one) vanishes, every step, and the weight never
    moves: the "stale weights" of Gopher's appendix C.2. Here each weight has a compensation buffer in its own dtype
    holding what rounding took from it (Kahan summation; Zamirai et al. 2020, arXiv:2010.06192; torch-optimi's
    Kahan optimizers), added back to the next update, so small updates accumulate until they move the weight; it
    starts as a draw within the weight's rounding cell (rounding_dither). The moments are float32, and the
    arithmetic is torch.optim.AdamW's, in float32: on float32 weights the compensation is always zero and this is
    AdamW to rounding (tests/test_precision.py). Why this and not the alternatives: a float32 master copy moves the
    bf16 weights the same way but costs 4 bytes per weight against 2 here; stochastic rounding costs none but draws
    random numbers at every step (an exact resume would have to restore that stream too) and is right only on
    average, one weight at a time. Memory per weight: 2 (weight) + 2 (compensation) + 8 (moments) + 2 (gradient)
    = 14 bytes, against 16 in float32."""

    # Each tensor is updated a slice of this many values at a time, through float32 scratch buffers that are reused:
    # on a CPU a slice that stays in cache (whole-tensor float32 temporaries are fresh allocations that the CPU
    # page-faults in at every step: that made the step 20x torch's fused AdamW on SmolLM2), on a GPU a large one.
    SLICE = {"cpu": 2**18, "cuda": 2**24}

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._scratch_buffers = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), compensation=rounding_dither(p, len(self.state)),
                                 exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                step = state["step"].item()
                # flat views (the gradient may be a copy: it is only read)
                tensors = [local(t).view(-1) for t in (p, state["exp_avg"], state["exp_avg_sq"], state["compensation"])]
                tensors.insert(1, local(p.grad).reshape(-1))
                size = self.SLICE.get(p.device.type, 2**24)
                for start in range(0, tensors[0].numel(), size):
                    self._update(*(t[start:start + size] for t in tensors), step=step, lr=lr, beta1=beta1,
                                 beta2=beta2, eps=eps, weight_decay=weight_decay)
        return None

    def _update(self, weight, grad, exp_avg, exp_avg_sq, compensation, step, lr, beta1, beta2, eps, weight_decay):
        """One slice of one tensor, in place: torch.optim.AdamW's arithmetic in float32, then the compensated write."""
        g = self._scratch(0, grad).copy_(grad)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # m / (sqrt(v / bc2) + eps) * lr / bc1, with the bias corrections moved onto the scalars (one pass fewer)
        bc2_sqrt = math.sqrt(1 - beta2**step)
        denom = torch.sqrt(exp_avg_sq, out=self._scratch(1, grad)).add_(eps * bc2_sqrt)
        # the weight as AdamW would leave it, in float32: decay, the Adam step, then what rounding took from it in
        # earlier steps; rounding to its dtype takes a little again, kept for the next step
        w = self._scratch(2, grad).copy_(weight)
        if weight_decay:
            w.mul_(1 - lr * weight_decay)
        w.addcdiv_(exp_avg, denom, value=-lr * bc2_sqrt / (1 - beta1**step)).add_(compensation)
        weight.copy_(w)
        compensation.copy_(w.sub_(weight))

    def _scratch(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Float32 scratch buffer i of like's length on its device, kept between steps (never in the state dict)."""
        key = (i, like.device)
        buffer = self._scratch_buffers.get(key)
        if buffer is None or len(buffer) < len(like):
            buffer = self._scratch_buffers[key] = torch.empty(len(like), dtype=torch.float32, device=like.device)
        return buffer[:len(like)]


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def rounding_dither(p: torch.Tensor, seed: int) -> torch.Tensor:
    """A half-precision weight's starting compensation: a draw, uniform over the weight's rounding cell, of where in
    it the exact weight lies. A bf16 weight stands for every value of its cell; starting all of them exactly on the
    grid would hold every weight back until its updates add up to half a rounding step and then move them all in
    the same step (on SmolLM2 at lr 2e-5 the loss fell in jumps and lagged float32's by several steps). From a draw,
    a small update moves the share of weights it would move from float32 values, from the first step. Seeded per
    tensor, so every rank of DDP draws the same; zero for float32 and for weights that are exactly 0."""
    out = torch.zeros_like(p)
    shard = local(out)  # FSDP2: this rank's shard, written in place
    if p.dtype not in (torch.bfloat16, torch.float16) or shard.numel() == 0:
        return out
    weights = local(p).detach().float()
    mantissa, exponent = torch.frexp(weights)  # weights = mantissa * 2**exponent, mantissa in [0.5, 1)
    bits = 8 if p.dtype == torch.bfloat16 else 11  # significant bits, the implicit one included
    cell = torch.ldexp(torch.ones_like(weights), exponent - bits)
    generator = torch.Generator(device=shard.device).manual_seed(seed)
    draw = (torch.rand(weights.shape, generator=generator, device=shard.device) - 0.5) * cell
    shard.copy_(draw.masked_fill_(weights == 0, 0.0))
    return out


class HalfPrecisionFloat32Adapters(HalfPrecision):
    """Fabric's bf16-true / 16-true, except that trainable adapter parameters (LoRA A and B, DoRA magnitudes) stay
    float32, as PEFT keeps them: in bf16 an adapter's small updates round away (DoRA's magnitudes, ~1 in size, never
    moved at lr 5e-4) and the adapter is a few MB. Fabric's own plugin casts the whole module in setup_module."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        adapters = {p: p.data for n, p in module.named_parameters() if is_lora_key(n)}
        module = module.to(dtype=self._desired_input_dtype)  # in place: the Parameter objects are kept
        for p, data in adapters.items():
            p.data = data
        return module


def precision_args(precision: str) -> dict:
    """Fabric's precision keyword for a --precision: the string, or for a "-true" half precision our plugin."""
    weights_dtype(precision)  # an unknown --precision: one line
    if precision in ("bf16-true", "16-true"):
        return dict(plugins=[HalfPrecisionFloat32Adapters(precision)])
    return dict(precision=precision)


def make_strategy(name: str, devices: int | str, num_nodes: int, shard=None):
    """Fabric's strategy for --strategy. fsdp: FSDP2, each device a data-parallel rank, the model sharded by
    shard(model, device_mesh) (default shard_blocks)."""
    if name == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy
        # pure data parallelism over every device (Lightning's "auto" would make the devices of a node a TP group)
        per_node = devices if isinstance(devices, int) else max(torch.cuda.device_count(), 1)
        return ModelParallelStrategy(parallelize_fn=shard or shard_blocks, data_parallel_size=per_node * num_nodes,
                                     tensor_parallel_size=1, save_distributed_checkpoint=False)
    if name in ("auto", "ddp"):
        return name
    raise InputError(f"--strategy {name!r}: expected auto, ddp or fsdp")


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
    raise InputError(f"--logger {name!r}: expected csv, tensorboard or wandb")


def clip_gradients(fabric, model, optimizer, max_norm: float, step: int, out_dir: Path) -> None:
    """Clip the gradients' norm to max_norm, and stop with a one-line error when it is not finite: a loss can be
    finite while a gradient overflows (fp16, a too-large lr), and the optimizer step would then write NaN into every
    weight. (Fabric's own check raises a RuntimeError with a traceback.)"""
    norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    if not torch.isfinite(norm):
        raise InputError(f"the gradient norm is {norm.item()} at step {step} although the loss is finite; the "
                         f"last good checkpoint in {out_dir} is kept (try a lower --train.lr)")


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
    if not file.is_file():
        raise InputError(f"{file}: not found; resume from a step checkpoint (final/ has no training state)")
    try:
        return torch.load(file, weights_only=True)  # our own format, read without unpickling code
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many types; all mean the same here
        raise InputError(f"{file}: not a readable training state ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:80]}...); resume from another step checkpoint") from None


def seed_ranks(fabric, seed: int) -> None:
    """After the weights are made (the same on every rank, from seed_everything): each rank its own random stream from
    here on, so LoRA dropout draws different masks on different ranks instead of the same mask world_size times. The
    data order does not use this stream (StepSampler and litdata seed their own)."""
    torch.manual_seed(seed + fabric.global_rank)  # seeds CUDA too


def rng_states(fabric) -> dict:
    """Every rank's random state, a row per rank (checkpoints are written by rank 0 alone), for restore_rng_states."""
    def gather(state: torch.Tensor) -> torch.Tensor:
        rows = fabric.all_gather(state.to(fabric.device))
        return (rows if fabric.world_size > 1 else rows[None]).cpu()

    cuda = fabric.device.type == "cuda"
    return dict(rng=gather(torch.get_rng_state()),
                cuda_rng=gather(torch.cuda.get_rng_state(fabric.device)) if cuda else None)


def restore_rng_states(fabric, saved: dict, seed: int) -> None:
    """Each rank continues its own saved stream. A checkpoint from another number of ranks has no stream for each
    rank: they start fresh ones (seed_ranks), and say so. (A checkpoint from before per-rank states holds one state.)"""
    rng, cuda_rng = saved["rng"], saved.get("cuda_rng")
    rows = rng[None] if rng.dim() == 1 else rng
    if len(rows) != fabric.world_size and not (rng.dim() == 1 and fabric.world_size == 1):
        fabric.print(f"the checkpoint holds the random streams of {len(rows)} rank(s), this run has "
                     f"{fabric.world_size}: dropout masks start fresh streams")
        seed_ranks(fabric, seed)
        return
    # clone: a row is a view at an offset, and set_rng_state reads a view's storage from its start (torch 2.13
    # crashes on one)
    torch.set_rng_state(rows[fabric.global_rank].clone())
    if cuda_rng is not None and fabric.device.type == "cuda":
        cuda_rows = cuda_rng[None] if cuda_rng.dim() == 1 else cuda_rng
        torch.cuda.set_rng_state(cuda_rows[fabric.global_rank].clone(), fabric.device)


def find_resume_dir(fabric, out_dir: Path, resume: str | None) -> Path | None:
    """--resume auto: the newest complete step checkpoint (a half-written one still has its temporary name,
    so it is never picked); --resume PATH: that one. First, what a killed run left half-written in out_dir is
    removed, and a checkpoint it was replacing when killed is put back (checkpoint.remove_stale_temporaries)."""
    if fabric.global_rank == 0:
        for path in remove_stale_temporaries(out_dir):
            fabric.print(f"removed {path}: left half-written by a run that was stopped")
    fabric.barrier()
    if resume is None:
        return None
    if resume != "auto":
        if not (Path(resume) / "state" / "train_state.pt").is_file():
            raise InputError(f"--resume {resume}: not a step checkpoint (state/train_state.pt missing)")
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


# Dense tensor-core peaks (FLOP/s) from NVIDIA's data sheets, sparsity excluded: (bf16/fp16, tf32, plain fp32)
GPU_PEAK_FLOPS = {"H200": (989e12, 495e12, 67e12), "H100 PCIe": (756e12, 378e12, 51e12),
                  "H100 NVL": (835e12, 418e12, 60e12), "H100": (989e12, 495e12, 67e12),
                  "A100": (312e12, 156e12, 19.5e12),
                  "L40S": (362e12, 183e12, 91.6e12), "4090": (165e12, 82.6e12, 82.6e12)}


def device_peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The device's peak FLOP/s for MFU in the training precision, and how it was found (logged once).

    GPU: the data-sheet table, in the precision's rate (fp32 matmuls run at the TF32 rate when torch allows TF32,
    as the scripts do with set_float32_matmul_precision("high")); an unlisted GPU has none (pass --peak_flops).
    CPU: the larger of a measured matmul (up to 2048^3, best of several; the CPU's practical peak) and the nominal
    cores x clock x FLOPs per cycle. A matmul timed while other work shares the cores measures too little, and MFU
    came out above 1 in a busy start; the nominal figure is a floor that no busy moment lowers."""
    half = precision.startswith(("bf16", "16"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        if row is None:
            return None, f"{name}: not in training.GPU_PEAK_FLOPS; pass --peak_flops"
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = row[0] if half else row[1] if tf32 else row[2]
        return peak, f"{name} data sheet, {'bf16' if half else 'tf32' if tf32 else 'fp32'} dense"
    if device.type != "cpu":
        return None, f"{device.type}: no peak known; pass --peak_flops"
    # Up to 2048^3, smaller where one matmul of the next size would take over 0.25 s: bf16 on a CPU without
    # AVX512-BF16 runs ~100x slower than fp32, and six 2048^3 products then took minutes before the first step.
    n = 512
    while True:
        a = torch.randn(n, n, dtype=torch.bfloat16 if half else torch.float32)
        a @ a  # warm up
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        if n == 2048 or best * 8 > 0.25:
            break
        n *= 2
    measured = 2 * n**3 / best
    nominal, how = cpu_nominal_flops(half)
    peak = max(measured, nominal)
    return peak, f"CPU, max of a {n}^3 matmul ({measured / 1e9:,.0f} GFLOP/s) and nominal {how}"


def cpu_nominal_flops(half: bool) -> tuple[float, str]:
    """Threads x clock x FLOPs per cycle and core: two FMA units of 8 fp32 lanes (AVX2) or of 16 (AVX-512); bf16
    doubles that where the CPU has AVX512-BF16. The clock is the one /proc/cpuinfo reports (a VM's base clock:
    turbo runs faster, which the measured matmul catches)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0.0, "(no /proc/cpuinfo)"
    mhz = [float(line.split(":")[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    if not mhz:
        return 0.0, "(no clock in /proc/cpuinfo)"
    per_cycle = 2 * 2 * (16 if "avx512f" in flags else 8 if "avx2" in flags else 4)
    if half and "avx512_bf16" in flags:
        per_cycle *= 2
    threads = torch.get_num_threads()
    flops = threads * max(mhz) * 1e6 * per_cycle
    return flops, f"{flops / 1e9:,.0f} GFLOP/s = {threads} threads x {max(mhz):,.0f} MHz x {per_cycle} FLOPs/cycle"




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
            raise InputError(f"the checkpoint's data order was drawn with --train.seed {state['seed']}, "
                             f"not {self.seed}; resume with the same seed")
        self.epoch, self.position = state["epoch"], state["position"]
