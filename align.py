"""Align a model on preferences: DPO and its family (IPO, hinge, robust/cDPO, APO-zero), the reference-free SimPO and
ORPO, and KTO on unpaired data; the whole model or a LoRA/DoRA/QLoRA adapter, from a checkpoint directory (a base,
an SFT result) to the same checkpoint format.

    python align.py --config config_hub/align_dpo.yaml --precision 32-true --fast_dev_run true    # 1 CPU
    python align.py --config config_hub/align_dpo.yaml                                            # 1 GPU
    python align.py --config config_hub/align_simpo.yaml --lora.r 16 --lora.targets '[q,k,v,o]'   # SimPO, LoRA
    python align.py --config config_hub/align_dpo.yaml --precompute_reference true                # reference once
    python align.py --config config_hub/align_dpo.yaml --devices 8 --strategy ddp                 # 8 GPUs
    python align.py --config config_hub/align_dpo.yaml --devices 8 --strategy fsdp    # 8 GPUs, policy and copy sharded

Data: JSON/JSONL records {"prompt", "chosen", "rejected"} (or {"prompt", "completion", "label"} for KTO), strings or
chat messages, rendered with the model's chat template as SFT renders them (pref_data.py). Each step puts a micro-
batch's chosen and rejected sequences through the policy in one forward pass, and through the reference in another,
and scores only their completion tokens, a chunk of positions at a time (GPT.token_logprobs: never the (B, T, vocab)
logits in float32). The reference is a frozen copy of the starting weights (--reference copy), or for an adapter the
base it sits on with the adapter switched off (--reference base, no second copy); --precompute_reference true runs it
once over the data before training and keeps its log-probs in out_dir/reference_logps.safetensors, which a resumed
run reads again. Reference-free losses (simpo, orpo) run no reference at all.

metrics.csv (and TensorBoard / W&B) carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected; with train_loss, val_loss, lr, tokens_per_sec, and at each validation
the model's answer to --eval.prompt in `sample`.
"""

import hashlib
import json
import math
import sys
import time
from argparse import ArgumentError
from collections import deque
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import lightning as L
from lightning.fabric.strategies import ModelParallelStrategy
import torch
import torch.nn.functional as F
from jsonargparse import CLI
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoint import (LORA_CONFIG, LORA_WEIGHTS, check_state_dict, check_writable_directory, load_config, load_frozen,
                        load_lora, load_lora_config, load_model, load_state_dict, require, save_checkpoint, save_lora,
                        compute_dtype, weights_dtype)
from generation import generate
from model import (IGNORE_INDEX, Block, InputError, LoRAConfig, add_lora, is_lora_key, lora_disabled,
                   lora_summary)
from pref_data import load_preference_data
from report import write_run_report
from sft_data import encode_prompt, resolve_style
from tokenizer import Tokenizer
from training import (MetricsCSV, StepSampler, StopSignal, clip_gradients, find_resume_dir, gather_full_state,
                      gather_trainable_state, load_full_state, load_train_state, lr_at, make_loggers, make_optimizer,
                      make_strategy, precision_args, prune_checkpoints, restore_rng_states, rng_states, seed_ranks)

QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")  # quantize.MODES
REWARDS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]
METRICS = ["step", "epoch", "tokens", "train_loss", "val_loss", *REWARDS, "val_rewards/accuracies",
           "val_rewards/margins", "kl", "lr", "tokens_per_sec", "sample"]


# ---- the losses -----------------------------------------------------------------------------------------------------
# Each takes the policy's and the reference's log-probs of the chosen and rejected completions, (B,) float32, and
# returns the loss of each pair (B,). `logratios` are log pi(y|x) - log pi_ref(y|x). Which log-probs each reads (the
# sum over the completion's tokens, or their mean) is in LOSSES below.

def sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7); with label_smoothing, conservative DPO (Mitchell 2023)."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    eps = args.label_smoothing
    return -F.logsigmoid(args.beta * logits) * (1 - eps) - F.logsigmoid(-args.beta * logits) * eps


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on token-averaged log-probs, as TRL: (h - 1/(2 beta))^2."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (logits - 1 / (2 * args.beta)) ** 2


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """SLiC's hinge on the reference-normalised margin (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - beta h)."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    return torch.relu(1 - args.beta * logits)


def robust_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, eq. 9): unbiased under labels flipped with rate eps."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    eps = args.label_smoothing
    return (-F.logsigmoid(args.beta * logits) * (1 - eps) + F.logsigmoid(-args.beta * logits) * eps) / (1 - 2 * eps)


def apo_zero_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266): raise the chosen likelihood, lower the rejected."""
    return (1 - torch.sigmoid(args.beta * (chosen - ref_chosen))) + torch.sigmoid(args.beta * (rejected - ref_rejected))


def simpo_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6), reference-free on token-averaged log-probs:
    -log sigmoid(beta * (avg_w - avg_l) - gamma), gamma = gamma_beta_ratio * beta."""
    return -F.logsigmoid(args.beta * (chosen - rejected) - args.gamma_beta_ratio * args.beta)


def orpo_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eq. 6-7), reference-free on token-averaged log-probs: the chosen
    completion's NLL plus lambda (here beta) times -log sigmoid of the log odds ratio, odds(y) = p / (1 - p)."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen - args.beta * F.logsigmoid(log_odds)


def kto_loss(logratios, desirable, kl, args):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8) for unpaired completions: a desirable one's value
    sigmoid(beta (r - z0)), an undesirable one's sigmoid(beta (z0 - r)), z0 the batch's KL estimate (detached), each
    loss 1 - value weighted by desirable_weight or undesirable_weight."""
    desirable_losses = args.desirable_weight * (1 - torch.sigmoid(args.beta * (logratios - kl)))
    undesirable_losses = args.undesirable_weight * (1 - torch.sigmoid(args.beta * (kl - logratios)))
    return torch.where(desirable, desirable_losses, undesirable_losses)


# name -> (function, token-averaged log-probs, needs a reference)
LOSSES = {"sigmoid": (sigmoid_loss, False, True), "ipo": (ipo_loss, True, True), "hinge": (hinge_loss, False, True),
          "robust": (robust_loss, False, True), "apo_zero": (apo_zero_loss, False, True),
          "simpo": (simpo_loss, True, False), "orpo": (orpo_loss, True, False), "kto": (kto_loss, False, True)}


# ---- arguments ------------------------------------------------------------------------------------------------------

@dataclass
class LossArgs:
    type: str = "sigmoid"  # sigmoid (DPO), ipo, hinge, robust, apo_zero, simpo, orpo, kto
    beta: float = 0.1  # the KL penalty's strength; SimPO's reward scale (its paper: 2.0-2.5); ORPO's lambda
    label_smoothing: float = 0.0  # sigmoid (conservative DPO) and robust: the assumed rate of flipped labels
    gamma_beta_ratio: float = 0.5  # simpo: the target margin gamma, as a fraction of beta
    sft_weight: float = 0.0  # add this times the chosen completion's NLL per token (TRL's rpo_alpha)
    desirable_weight: float = 1.0  # kto: weight of the desirable examples' losses
    undesirable_weight: float = 1.0  # kto: weight of the undesirable examples' losses

    def __post_init__(self):
        require(self.type in LOSSES, "--loss.type", repr(self.type), f"one of {', '.join(LOSSES)}")
        require(self.beta > 0, "--loss.beta", self.beta, "a positive number")
        require(0 <= self.label_smoothing < 0.5, "--loss.label_smoothing", self.label_smoothing, "a rate in [0, 0.5)")
        require(self.gamma_beta_ratio >= 0, "--loss.gamma_beta_ratio", self.gamma_beta_ratio, "a number >= 0")
        require(self.sft_weight >= 0, "--loss.sft_weight", self.sft_weight, "a weight >= 0")
        require(self.desirable_weight > 0 and self.undesirable_weight > 0, "--loss.desirable_weight",
                (self.desirable_weight, self.undesirable_weight), "positive weights")


@dataclass
class DataArgs:
    train_files: str | list[str] = field(default_factory=list)  # JSON or JSONL preference records
    val_files: str | list[str] | None = None  # held-out records; when None, val_split of the train records
    val_split: float = 0.05  # fraction of the train records held out for validation (0: none) unless val_files
    prompt_style: str = "auto"  # chat_template, alpaca, or auto: the chat template when the tokenizer has one
    max_seq_length: int | None = None  # prompt + completion; longer ones lose the completion's end; None: block_size

    def __post_init__(self):
        require(0 <= self.val_split < 1, "--data.val_split", self.val_split, "a fraction in [0, 1)")
        require(self.max_seq_length is None or self.max_seq_length >= 2, "--data.max_seq_length",
                self.max_seq_length, "at least 2 tokens (a prompt token and a completion token) or null (block_size)")


@dataclass
class TrainArgs:
    global_batch_size: int = 16  # pairs (or KTO examples) per optimizer step, all ranks together
    micro_batch_size: int = 2  # pairs per forward pass on one rank (2x sequences: chosen and rejected)
    epochs: int | None = 1  # passes over the training pairs...
    max_steps: int | None = None  # ...or optimizer steps (the lower wins)
    max_time: float | None = None  # ...or seconds of training (checkpoint and stop)
    lr: float = 5e-7
    min_lr: float = 0.0  # cosine decays to this
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
    loss: LossArgs = LossArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    lora: LoRAConfig | None = None,
    quantize: str | None = None,
    reference: str = "auto",
    reference_dir: Path | None = None,
    reference_quantize: str | None = None,
    precompute_reference: bool = False,
    out_dir: Path = Path("out/align"),
    resume: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    logger: str = "csv",
    fast_dev_run: bool = False,
) -> None:
    """Align a checkpoint on preference data.

    Args:
        checkpoint_dir: the policy to start from (model.safetensors, model_config.yaml, tokenizer files).
        data: the preference files, prompt style and sequence length.
        loss: which loss, and its beta and other constants.
        train: batch sizes, stopping, optimizer and schedule.
        eval: validation interval and size, and the prompt sampled at each validation.
        checkpoint: checkpoint interval and retention.
        lora: train a LoRA/DoRA adapter with this config instead of every weight (e.g. --lora.r 16).
        quantize: with lora: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8 quantises the frozen base (QLoRA).
        reference: copy (a frozen copy of reference_dir), base (with lora: the base alone, the adapter switched
            off; no second copy), or auto (base with lora, else copy). Unused by simpo and orpo.
        reference_dir: the reference checkpoint for copy; default checkpoint_dir.
        reference_quantize: with copy: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8 quantises the frozen copy
            (nf4: about a quarter of its float32 memory; its log-probs move by the quantisation error).
        precompute_reference: run the reference once over the data before training and keep its log-probs in
            out_dir/reference_logps.safetensors (reused on resume), instead of a forward pass at every step.
        out_dir: where checkpoints, metrics.csv and final/ go.
        resume: "auto" (the newest complete step checkpoint in out_dir, if any) or a step directory.
        devices: devices per node.
        num_nodes: nodes (SLURM sets the rest).
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed.
        strategy: auto (one device), ddp, or fsdp (FSDP2, fully_shard per Block; a reference copy sharded too).
        activation_checkpointing: recompute each Block in the backward pass to save memory.
        logger: csv (always written), plus tensorboard or wandb when named.
        fast_dev_run: a few steps with validation and a checkpoint, to smoke-test a config before a long run.
    """
    # before any work: a file in the way is the user's (never replaced), and final/ is not an input
    check_writable_directory(Path(out_dir) / "final", reads=[checkpoint_dir, reference_dir])
    require(reference in ("auto", "copy", "base"), "--reference", repr(reference), "auto, copy or base")
    starts_from_adapter = (Path(checkpoint_dir) / LORA_CONFIG).is_file()
    require(reference != "base" or lora is not None or starts_from_adapter, "--reference", "base",
            "--lora too (the base under an adapter)")
    require(quantize is None or quantize in QUANTIZE_MODES, "--quantize", repr(quantize),
            f"one of {', '.join(QUANTIZE_MODES)}")
    require(quantize is None or lora is not None or starts_from_adapter, "--quantize", quantize,
            "--lora too: a quantised base is frozen")
    require(reference_quantize is None or reference_quantize in QUANTIZE_MODES, "--reference_quantize",
            repr(reference_quantize), f"one of {', '.join(QUANTIZE_MODES)}")
    require(not (strategy == "fsdp" and (quantize or reference_quantize)), "--strategy", "fsdp",
            "no --quantize or --reference_quantize: FSDP cannot shard bitsandbytes layers (use ddp)")
    if fast_dev_run:
        train.epochs, train.max_steps, train.max_time = None, 4, None
        eval.interval, eval.max_batches, checkpoint.interval = 2, 2, 4
    # The resolved arguments, stored in every checkpoint's metadata so that it says how it was made
    run_args = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, **precision_args(precision),
                      strategy=make_strategy(strategy, devices, num_nodes), loggers=make_loggers(logger, out_dir))
    fabric.launch()
    main(fabric, checkpoint_dir=Path(checkpoint_dir), data=data, loss=loss, train=train, eval=eval, ckpt=checkpoint,
         lora=lora, quantize=quantize, reference=reference, reference_dir=Path(reference_dir or checkpoint_dir),
         reference_quantize=reference_quantize, precompute_reference=precompute_reference, out_dir=Path(out_dir),
         resume=resume, precision=precision, activation_checkpointing=activation_checkpointing, run_args=run_args)
    for logger in fabric.loggers:  # TensorBoard writes out and closes its event file
        logger.finalize("success")


def main(fabric, *, checkpoint_dir: Path, data: DataArgs, loss: LossArgs, train: TrainArgs, eval: EvalArgs,
         ckpt: CheckpointArgs, lora: LoRAConfig | None, quantize: str | None, reference: str, reference_dir: Path,
         reference_quantize: str | None, precompute_reference: bool, out_dir: Path, resume: str | None, precision: str,
         activation_checkpointing: bool, run_args: dict) -> None:
    # A LoRA directory (an SFT adapter) to start from: its base with the adapter on top, and the adapter trains on
    base_dir, start_adapter = checkpoint_dir, (checkpoint_dir / LORA_CONFIG).is_file()
    if start_adapter:
        adapter_config, base_dir = load_lora_config(checkpoint_dir)
        if lora is not None and lora != adapter_config:
            raise InputError(f"--lora: {checkpoint_dir} is an adapter with its own config ({adapter_config}); "
                             "leave --lora out to train it on")
        lora = adapter_config
    config = load_config(base_dir)
    tokenizer_dir = checkpoint_dir if (checkpoint_dir / "tokenizer.json").is_file() else base_dir
    tokenizer = Tokenizer(tokenizer_dir)
    world = fabric.world_size
    if train.global_batch_size % (train.micro_batch_size * world):
        raise InputError(f"--train.global_batch_size {train.global_batch_size} must be a multiple of "
                         f"micro_batch_size x world size = {train.micro_batch_size * world}")
    accum_steps = train.global_batch_size // (train.micro_batch_size * world)
    max_seq_length = data.max_seq_length or config.block_size
    train_set, val_set = load_data(fabric, data, tokenizer, max_seq_length, config.block_size, train.seed)
    if (loss.type == "kto") == train_set.paired:
        raise InputError(f"--loss.type {loss.type}: needs {'unpaired' if loss.type == 'kto' else 'paired'} records, "
                         f"and {data.train_files} holds {'pairs' if train_set.paired else 'unpaired ones'}")
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
    # On the CPU first: the strategy moves it to the devices in setup_module. Quantised: each layer is packed on the
    # device it will run on (see quantize.py).
    model = load_model(base_dir, device=fabric.device if quantize else "cpu", dtype=weights_dtype(precision),
                       quantize=quantize)
    if lora is not None:
        try:
            add_lora(model, lora)  # the targeted Linears become LoRALinear; only lora_* parameters train
        except ValueError as e:  # e.g. lm_head on a model with tied embeddings
            raise InputError(f"--lora.targets: {e}") from None
        if start_adapter:
            load_lora(model, checkpoint_dir)  # one line naming the file if it does not fit its base
    needs_reference = LOSSES[loss.type][2]
    if needs_reference and reference == "auto":  # an SFT adapter's reference is the SFT model: the base with it on
        reference = "base" if lora is not None and not start_adapter else "copy"
    if needs_reference and reference == "base" and start_adapter:
        raise InputError(f"--reference base: {checkpoint_dir} is an adapter, and its base alone is not the model "
                         "being aligned; use --reference copy")
    if reference_quantize and not (needs_reference and reference == "copy"):
        raise InputError(f"--reference_quantize quantises a frozen copy; this run's reference is "
                         f"{reference if needs_reference else 'none (' + loss.type + ')'}")
    reference_model = None
    sharded = isinstance(fabric.strategy, ModelParallelStrategy)  # FSDP2: a reference copy is sharded too
    if needs_reference and reference == "copy":
        # under FSDP on the CPU first, then sharded like the policy below; else straight to the device
        reference_model = load_frozen(reference_dir, "cpu" if sharded else fabric.device, weights_dtype(precision),
                                      reference_quantize, compute_dtype(precision))
        if {**asdict(reference_model.config), "name": ""} != {**asdict(config), "name": ""}:
            raise InputError(f"--reference_dir {reference_dir}: another model ({reference_model.config.name}) than "
                             f"--checkpoint_dir {checkpoint_dir} ({config.name}); the reference must score the same "
                             "tokens")
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    trained = lora_summary(model) if lora is not None else \
        f"{sum(p.numel() for p in model.parameters()):,} parameters, all trained"
    fabric.print(f"{config.name}{' ' + quantize if quantize else ''}: {trained}; loss {loss.type} (beta {loss.beta}), "
                 f"reference {reference if needs_reference else 'none'}"
                 f"{', precomputed' if needs_reference and precompute_reference else ''}; {world} rank(s), "
                 f"{accum_steps} micro-batch(es) of {train.micro_batch_size} per rank and step, {max_steps} steps "
                 f"({sampler.steps_per_epoch} per epoch)")
    seed_ranks(fabric, train.seed)  # the weights are made: from here on each rank draws its own dropout masks
    model = fabric.setup_module(model)
    raw_model = model.module  # unwrapped: its parameter names carry no wrapper prefix, in groups and checkpoints
    # after setup: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model, train.lr, train.weight_decay, train.betas,
                                                       fabric.device))
    if reference_model is not None and sharded:  # each rank holds 1/world of the copy, gathered Block by Block
        reference_model = fabric.setup_module(reference_model)
    # batch -> the reference's summed log-probs of its rows, and their token counts: a frozen copy's forward pass, or
    # the policy's own with its adapter switched off
    score_reference = None
    if needs_reference:
        if reference == "copy":
            score_reference = lambda batch: reference_logps_of_copy(fabric, reference_model, batch)  # noqa: E731
        else:
            score_reference = lambda batch: reference_logps_of_base(fabric, raw_model, batch)  # noqa: E731
    precomputed = None
    if needs_reference and precompute_reference:
        precomputed = load_or_compute_reference(fabric, out_dir / "reference_logps.safetensors", score_reference,
                                                {"train": train_set, "val": val_set}, train.micro_batch_size,
                                                max_seq_length, reference, reference_dir, reference_quantize)
        reference_model = None  # its log-probs are all kept: free its memory

    state = dict(step=0, tokens=0, train_time=0.0)
    resume_dir = find_resume_dir(fabric, out_dir, resume)
    if resume_dir is not None:
        load_training_state(fabric, resume_dir, raw_model, optimizer, sampler, state, lora is not None)
        fabric.print(f"resumed from {resume_dir} at step {state['step']}")

    def reference_logps(split: str, ids: list[int], batch: dict) -> torch.Tensor | None:
        """The reference's summed log-probs of the batch's rows, from the precomputed table or a forward pass."""
        if not needs_reference:
            return None
        if precomputed is not None:
            table = precomputed[split]
            return torch.cat([table[ids, 0], table[ids, 1]]).to(fabric.device)
        return score_reference(batch)[0]

    metrics = MetricsCSV(out_dir / "metrics.csv", METRICS, fabric.global_rank == 0, truncate_after_step=state["step"])
    stop_signal = StopSignal(fabric)
    progress = tqdm(total=max_steps, initial=state["step"], disable=fabric.global_rank != 0, desc="align",
                    dynamic_ncols=True)
    recent = deque(maxlen=10)  # (tokens, seconds) of the last steps' training, eval and checkpoints excluded
    for step in range(state["step"] + 1, max_steps + 1):
        last_step = step == max_steps
        lr = lr_at(step, train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        micro_ids = sampler.next_step()
        sums = torch.zeros(len(SUMS), device=fabric.device)  # this rank's sums of the step's statistics
        for i, ids in enumerate(micro_ids):
            batch = train_set.collate(ids, max_seq_length)
            ref = reference_logps("train", ids, batch)
            with fabric.no_backward_sync(model, enabled=i < len(micro_ids) - 1):
                pair_losses, stats = preference_loss(fabric, model, batch, ref, loss)
                # each pair weighs 1 / (pairs of the step), whatever the micro-batch and rank it lands on; x world
                # size because DDP averages the gradients of the ranks
                fabric.backward(pair_losses.sum() * world / train.global_batch_size)
            sums += stats
        sums = fabric.all_reduce(sums, reduce_op="sum")
        row_stats = summarise(sums)
        if not math.isfinite(row_stats["train_loss"]):
            raise InputError(f"loss is {row_stats['train_loss']} at step {step}; the last good checkpoint in "
                             f"{out_dir} is kept (try a lower --train.lr or --train.grad_clip)")
        if train.grad_clip:
            clip_gradients(fabric, model, optimizer, train.grad_clip, step, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_time = time.perf_counter() - step_start
        state["step"] = step
        state["tokens"] += int(sums[SUMS.index("tokens")].item())
        state["train_time"] += step_time
        recent.append((int(sums[SUMS.index("tokens")].item()), step_time))
        tokens_per_sec = sum(t for t, _ in recent) / sum(s for _, s in recent)
        row = dict(step=step, epoch=round(sampler.epochs_done, 4), tokens=state["tokens"], **row_stats, lr=lr,
                   tokens_per_sec=tokens_per_sec)
        if step % eval.interval == 0 or last_step:
            if len(val_set):
                val_stats = validate(fabric, model, val_set, train.micro_batch_size, eval.max_batches, max_seq_length,
                                     lambda ids, batch: reference_logps("val", ids, batch), loss)
                row.update({"val_loss": val_stats["train_loss"],
                            "val_rewards/accuracies": val_stats["rewards/accuracies"],
                            "val_rewards/margins": val_stats["rewards/margins"]})
            row["sample"] = generate_sample(fabric, raw_model, tokenizer, prompt_ids, eval.max_new_tokens)
            if fabric.global_rank == 0:
                tqdm.write(f"step {step}: {eval.prompt!r} -> {row['sample']!r}")
        progress.update(1)
        progress.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                             **({"acc": f"{row['rewards/accuracies']:.2f}"} if row["rewards/accuracies"] is not None
                                else {}))
        metrics.log(row)
        fabric.log_dict({k: v for k, v in row.items() if v is not None and k != "sample"}, step=step)

        out_of_time = train.max_time is not None and state["train_time"] >= train.max_time
        stop = stop_signal.requested()
        if step % ckpt.interval == 0 or last_step or out_of_time or stop:
            save_checkpoint_dir(fabric, out_dir / f"step-{step:08d}", raw_model, optimizer, sampler, state,
                                config=config, lora=lora, base_dir=base_dir, tokenizer_dir=tokenizer_dir,
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

    save_checkpoint_dir(fabric, out_dir / "final", raw_model, optimizer, sampler, state, config=config, lora=lora,
                        base_dir=base_dir, tokenizer_dir=tokenizer_dir, run_args=run_args, with_state=False)
    fabric.print(f"final checkpoint: {out_dir / 'final'}")
    write_run_report(out_dir, enabled=fabric.global_rank == 0)  # out_dir/report.png: the run's metrics drawn
    if fabric.device.type == "cuda":
        fabric.print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(fabric.device) / 2**30:.2f} GiB")


# ---- one step's loss ------------------------------------------------------------------------------------------------

# What a micro-batch adds to the step's statistics, summed over micro-batches and ranks (summarise divides)
SUMS = ["loss", "pairs", "chosen_rewards", "rejected_rewards", "wins", "chosen_logps", "rejected_logps", "kl",
        "kl_examples", "desirable", "tokens"]


def sequence_logps(fabric, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its completion tokens, (rows,) float32, and their counts (rows,). Under the
    run's autocast also for a model Fabric did not wrap (the reference), so that both compute alike."""
    x, y = batch["input_ids"].to(fabric.device), batch["labels"].to(fabric.device)
    with fabric.autocast():
        token_logps = model(x, targets=y, per_token=True)  # (rows, T), 0 where the target is IGNORE_INDEX
    return token_logps.sum(-1), (y != IGNORE_INDEX).sum(-1)


@torch.no_grad()
def reference_logps_of_copy(fabric, reference_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence_logps(fabric, reference_model, batch)


@torch.no_grad()
def reference_logps_of_base(fabric, raw_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA policy's base with the adapter switched off: the reference without a second copy of the weights."""
    with lora_disabled(raw_model):
        return sequence_logps(fabric, raw_model, batch)


def preference_loss(fabric, model, batch: dict, ref_logps: torch.Tensor | None,
                    loss: LossArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's forward pass over the micro-batch (chosen and rejected rows together), the loss of each pair (B,)
    with its gradient, and the micro-batch's statistics (SUMS) detached."""
    fn, averaged, _ = LOSSES[loss.type]
    logps, lengths = sequence_logps(fabric, model, batch)
    lengths = lengths.clamp(min=1).to(logps.dtype)
    B = len(logps) // 2
    stats = dict.fromkeys(SUMS, 0.0)
    if loss.type == "kto":
        # rows 0..B-1: the examples; B..2B-1: each prompt with another example's completion, for the KL estimate
        logratios = logps - ref_logps
        kl = fabric.all_reduce(logratios[B:].detach().mean(), reduce_op="mean").clamp(min=0)
        desirable = batch["label"].to(fabric.device)
        pair_losses = fn(logratios[:B], desirable, kl, loss)
        rewards = loss.beta * logratios[:B].detach()
        example_logps = logps[:B].detach()
        stats.update(chosen_rewards=rewards[desirable].sum(), rejected_rewards=rewards[~desirable].sum(),
                     chosen_logps=example_logps[desirable].sum(), rejected_logps=example_logps[~desirable].sum(),
                     kl=kl * B, kl_examples=B, desirable=desirable.sum())
    else:
        policy = logps / lengths if averaged else logps
        ref = None if ref_logps is None else (ref_logps / lengths if averaged else ref_logps)
        chosen, rejected = policy[:B], policy[B:]
        ref_chosen, ref_rejected = (None, None) if ref is None else (ref[:B], ref[B:])
        pair_losses = fn(chosen, rejected, ref_chosen, ref_rejected, loss)
        if ref is None:  # reference-free: TRL's CPO/ORPO rewards, beta times the (averaged) log-probs
            chosen_rewards, rejected_rewards = loss.beta * chosen.detach(), loss.beta * rejected.detach()
        else:
            chosen_rewards = loss.beta * (chosen - ref_chosen).detach()
            rejected_rewards = loss.beta * (rejected - ref_rejected).detach()
        stats.update(chosen_rewards=chosen_rewards.sum(), rejected_rewards=rejected_rewards.sum(),
                     wins=(chosen_rewards > rejected_rewards).sum(),  # a tie is not a win, as in TRL
                     chosen_logps=logps[:B].detach().sum(), rejected_logps=logps[B:].detach().sum())
    if loss.sft_weight:  # the chosen (desirable) completion's NLL per token
        nll = -logps[:B] / lengths[:B]
        if loss.type == "kto":
            nll = nll * batch["label"].to(fabric.device)
        pair_losses = pair_losses + loss.sft_weight * nll
    stats.update(loss=pair_losses.detach().sum(), pairs=B, tokens=batch["lengths"].sum())
    return pair_losses, torch.stack([torch.as_tensor(stats[k], dtype=torch.float32, device=fabric.device).reshape(())
                                     for k in SUMS])


def summarise(sums: torch.Tensor) -> dict:
    """The step's (or validation's) metrics, with TRL's names, from the statistics summed over micro-batches and
    ranks."""
    s = dict(zip(SUMS, sums.tolist()))
    pairs = max(s["pairs"], 1)
    if s["kl_examples"]:  # KTO: rewards/chosen over the desirable examples, rewards/rejected over the others
        desirable, undesirable = max(s["desirable"], 1), max(s["pairs"] - s["desirable"], 1)
        return {"train_loss": s["loss"] / pairs, "rewards/chosen": s["chosen_rewards"] / desirable,
                "rewards/rejected": s["rejected_rewards"] / undesirable, "rewards/accuracies": None,
                "rewards/margins": s["chosen_rewards"] / desirable - s["rejected_rewards"] / undesirable,
                "logps/chosen": s["chosen_logps"] / desirable, "logps/rejected": s["rejected_logps"] / undesirable,
                "kl": s["kl"] / s["kl_examples"]}
    return {"train_loss": s["loss"] / pairs, "rewards/chosen": s["chosen_rewards"] / pairs,
            "rewards/rejected": s["rejected_rewards"] / pairs, "rewards/accuracies": s["wins"] / pairs,
            "rewards/margins": (s["chosen_rewards"] - s["rejected_rewards"]) / pairs,
            "logps/chosen": s["chosen_logps"] / pairs, "logps/rejected": s["rejected_logps"] / pairs, "kl": None}


@torch.no_grad()
def validate(fabric, model, val_set, micro_batch_size: int, max_batches: int | None, max_seq_length: int,
             reference_logps, loss: LossArgs) -> dict:
    """The metrics of the val set (or of its first max_batches micro-batches per rank), all ranks."""
    model.eval()
    chunks = [list(range(i, min(i + micro_batch_size, len(val_set)))) for i in range(0, len(val_set), micro_batch_size)]
    # The same number of forward passes on every rank (a rank out of examples repeats one and does not count it)
    n_batches = min(-(-len(chunks) // fabric.world_size), max_batches or len(chunks))
    sums = torch.zeros(len(SUMS), device=fabric.device)
    for ids in (chunks[fabric.global_rank::fabric.world_size] + [[]] * n_batches)[:n_batches]:
        batch = val_set.collate(ids or [0], max_seq_length)
        _, stats = preference_loss(fabric, model, batch, reference_logps(ids or [0], batch), loss)
        sums += stats if ids else 0
    model.train()
    return summarise(fabric.all_reduce(sums, reduce_op="sum"))


# ---- the reference's log-probs, once ------------------------------------------------------------------------------

def load_or_compute_reference(fabric, path: Path, score_reference, datasets: dict, micro_batch_size: int,
                              max_seq_length: int, reference: str, reference_dir: Path,
                              reference_quantize: str | None) -> dict[str, torch.Tensor]:
    """split -> (examples, 2) float32: the reference's summed log-probs of each pair's chosen and rejected
    completion (KTO: of each example's completion and of its KL row), read from path when a run with the
    same reference and data wrote it, else computed (each rank a share of the examples) and written there by rank 0."""
    fingerprint = json.dumps({"reference": reference, "reference_dir": str(Path(reference_dir).resolve()),
                              "reference_quantize": reference_quantize, "max_seq_length": max_seq_length,
                              **{split: data_fingerprint(ds) for split, ds in datasets.items()}})
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as f:
                tables, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many types; all mean the same
            raise InputError(f"{path}: not a readable table of reference log-probs ({type(e).__name__}); delete "
                             "it to compute them again") from None
        if metadata.get("fingerprint") != fingerprint:
            raise InputError(f"{path}: reference log-probs of another reference or data set; delete it or use "
                             "another --out_dir")
        fabric.print(f"reference log-probs read from {path}")
        return tables
    tables = {}
    for split, dataset in datasets.items():
        table = torch.zeros(len(dataset), 2, device=fabric.device)
        mine = list(range(fabric.global_rank, len(dataset), fabric.world_size))
        # As many passes on every rank (under FSDP each forward is a collective): one out of examples scores example
        # 0 again and drops it
        passes = -(-len(range(0, len(dataset), fabric.world_size)) // micro_batch_size)
        for start in tqdm(range(0, passes * micro_batch_size, micro_batch_size), disable=fabric.global_rank != 0,
                          desc=f"reference log-probs ({split})", dynamic_ncols=True):
            ids = mine[start:start + micro_batch_size]
            batch = dataset.collate(ids or [0], max_seq_length)
            logps = score_reference(batch)[0]  # (under no_grad: both reference functions are)
            if ids:
                table[ids] = torch.stack([logps[:len(ids)], logps[len(ids):]], dim=1)
        tables[split] = fabric.all_reduce(table, reduce_op="sum").cpu()  # each example filled by one rank
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tables, tmp, metadata={"fingerprint": fingerprint})
        tmp.replace(path)  # complete or absent: a run killed while writing computes it again
    fabric.barrier()
    return tables


def data_fingerprint(dataset) -> str:
    """What the precomputed log-probs depend on: every example's token ids (and KTO's KL partners), hashed."""
    digest = hashlib.sha256()
    for example in dataset.examples:
        for part in example:
            digest.update(part.numpy().tobytes() if isinstance(part, torch.Tensor) else str(part).encode())
            digest.update(b"|")
    if dataset.kl_partners:
        digest.update(str(dataset.kl_partners).encode())
    return digest.hexdigest()


# ---- data, samples, checkpoints --------------------------------------------------------------------------------------

def load_data(fabric, data: DataArgs, tokenizer: Tokenizer, max_seq_length: int, block_size: int, seed: int):
    if not data.train_files:
        raise InputError("--data.train_files: name the JSON or JSONL preference files to train on")
    if max_seq_length > block_size:
        raise InputError(f"--data.max_seq_length {max_seq_length} exceeds the model's block_size {block_size}")
    train_set, val_set, stats = load_preference_data(
        data.train_files, tokenizer, prompt_style=data.prompt_style, max_seq_length=max_seq_length,
        val_split=0.0 if data.val_files else data.val_split, val_paths=data.val_files, seed=seed)
    fabric.print(f"{stats['train']:,} train and {stats['val']:,} val {'pairs' if stats['paired'] else 'examples'}, "
                 f"prompt style {resolve_style(tokenizer, data.prompt_style)}; {stats['truncated']:,} truncated to "
                 f"{max_seq_length} tokens, {stats['dropped']:,} dropped (the prompt fills max_seq_length), "
                 f"{stats['identical']:,} dropped (chosen = rejected)")
    return train_set, val_set


def generate_sample(fabric, raw_model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy answer to the eval prompt. Every rank generates: under FSDP each forward is a collective."""
    raw_model.eval()
    with fabric.autocast():
        ids = generate(raw_model, [prompt_ids], max_new_tokens, stop_ids=tokenizer.stop_ids, temperature=0.0)[0]
    raw_model.clear_kv_cache()  # training runs without a cache
    raw_model.train()
    return tokenizer.decode(ids, skip_special_tokens=True)


def save_checkpoint_dir(fabric, path: Path, raw_model, optimizer, sampler, state, *, config, lora, base_dir,
                        tokenizer_dir, run_args, with_state: bool) -> None:
    """A checkpoint directory every script reads (the full weights, or an adapter naming its base), plus state/ to
    resume. An adapter gathers and saves only the trainable tensors."""
    gather = gather_trainable_state if lora is not None else gather_full_state
    model_state, optim_state = gather(raw_model, optimizer, with_optimizer=with_state)
    rng = rng_states(fabric)  # a collective: every rank
    if fabric.global_rank == 0:
        train_state = dict(optimizer=optim_state, sampler=sampler.state_dict(), **rng, **state) if with_state else None
        metadata = dict(script=Path(__file__).name, step=state["step"], args=json.dumps(run_args, default=str))
        if lora is not None:
            save_lora(path, lora, {k: v for k, v in model_state.items() if is_lora_key(k)}, base_dir, tokenizer_dir,
                      metadata=metadata, train_state=train_state)
        else:
            save_checkpoint(path, config, model_state, tokenizer_dir, metadata=metadata, train_state=train_state)
    fabric.barrier()


def load_training_state(fabric, path: Path, raw_model, optimizer, sampler, state, is_lora: bool) -> None:
    saved = load_train_state(path)
    weights = path / (LORA_WEIGHTS if is_lora else "model.safetensors")
    state_dict = load_state_dict(weights)
    check_state_dict(raw_model, state_dict, weights, lora=is_lora)  # a step checkpoint of another model or --lora
    # strict=False for an adapter: the frozen base came from checkpoint_dir
    load_full_state(raw_model, optimizer, state_dict, saved["optimizer"], strict=not is_lora)
    sampler.load_state_dict(saved["sampler"])
    restore_rng_states(fabric, saved, sampler.seed)
    state.update(step=saved["step"], tokens=saved["tokens"], train_time=saved["train_time"])


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(setup, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
    except ValueError as e:  # jsonargparse reports a bad --lora.r (`LoRAConfig | None`) as no Union member matching,
        if not isinstance(e.__cause__, InputError):  # the LoRAConfig error as its cause; other errors are bugs
            raise
        sys.exit(f"error: {e.__cause__}")
