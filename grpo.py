"""Reinforcement learning with verifiable rewards: a policy samples G answers to each prompt, Python functions score
them, and the policy learns from the scores. GRPO (Shao et al. 2024, arXiv:2402.03300) with the Dr. GRPO (Liu et al.
2025, arXiv:2503.20783) and DAPO (Yu et al. 2025, arXiv:2503.14476) corrections; the whole model or a LoRA/DoRA/QLoRA
adapter, from a checkpoint directory to the same checkpoint format.

    python grpo.py --config config_hub/grpo_arithmetic.yaml --fast_dev_run true                 # 1 CPU, smoke test
    python grpo.py --config config_hub/grpo_arithmetic.yaml                                      # 1 CPU or GPU
    python grpo.py --config config_hub/grpo_arithmetic.yaml --lora.r 16 --lora.targets '[q,k,v,o]'   # LoRA
    python grpo.py --config config_hub/grpo_arithmetic.yaml --devices 8 --strategy ddp            # 8 GPUs

Data: JSON/JSONL records {"prompt": a string or chat messages, ...any other fields}, rendered with the model's chat
template (or as plain text for a base model); the other fields reach the reward functions. Rewards: functions with
TRL's signature named as module:function (rewards.py ships final_number, strict_format and length_penalty), summed
with --reward_weights; a None is "not applicable".

A step: the step's prompts are split over the ranks; each rank samples G completions of each of its prompts with the
KV-cache sampler (generation.py), keeping the sampler's token log-probs; every completion is scored; advantages are
the rewards centred on their group's mean (and scaled, --loss.scale_rewards); then --loss.num_iterations updates of
the policy on that rollout, each one optimizer step over all of it in micro-batches: the clipped ratio objective,
normalised by --loss.type over the whole step (all micro-batches and ranks), so that it never depends on how the step
is split. The stop token stays in the loss (the policy learns to stop); prompts and padding never count.

metrics.csv (and TensorBoard / W&B) carry TRL's names: reward, reward_std, rewards/<fn>/mean and /std,
frac_reward_zero_std, completions/mean_length, completions/clipped_ratio, kl, entropy, clip_ratio/low_mean,
clip_ratio/high_mean; with loss, val_reward (greedy answers to the held-out prompts), lr, rollout_s and update_s (the
step's seconds of sampling and scoring, and of learning), tokens_per_sec (completion tokens sampled per second of
rollout). out_dir/completions.jsonl holds a few completions of every step with their rewards and advantages.
"""

import copy
import importlib
import importlib.util
import json
import math
import sys
import time
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse import CLI
from tqdm import tqdm

from checkpoint import (LORA_CONFIG, LORA_WEIGHTS, check_state_dict, check_writable_directory, load_config, load_frozen,
                        load_lora, load_lora_config, load_model, load_state_dict, require, save_checkpoint, save_lora,
                        weights_dtype)
from generation import generate_tokens, use_decode_layout
from model import (IGNORE_INDEX, Block, InputError, LoRAConfig, LoRALinear, add_lora, is_lora_key, lora_disabled,
                   lora_summary, merge_lora)
from pref_data import to_prompt
from report import write_run_report
from sft_data import DataError, encode_prompt, hold_out, read_json_records
from tokenizer import Tokenizer
from training import (MetricsCSV, StepSampler, StopSignal, clip_gradients, find_resume_dir, gather_full_state,
                      gather_trainable_state, load_full_state, load_train_state, lr_at, make_loggers, make_optimizer,
                      make_strategy, precision_args, prune_checkpoints, restore_rng_states, rng_states, seed_ranks)

QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")  # quantize.MODES
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
PROMPT_STYLES = ("auto", "chat_template", "plain", "alpaca")


# ---- arguments ------------------------------------------------------------------------------------------------------

@dataclass
class DataArgs:
    train_files: str | list[str] = field(default_factory=list)  # JSON or JSONL records {"prompt": ..., other fields}
    val_files: str | list[str] | None = None  # held-out prompts; when None, val_split of the train records
    val_split: float = 0.0  # fraction of the train records held out for validation (0: none) unless val_files
    prompt_style: str = "auto"  # chat_template, plain (the text, after bos), alpaca; auto: the chat template if any
    max_prompt_length: int | None = None  # longer prompts are dropped (counted); None: block_size - max_new_tokens

    def __post_init__(self):
        require(0 <= self.val_split < 1, "--data.val_split", self.val_split, "a fraction in [0, 1)")
        require(self.prompt_style in PROMPT_STYLES, "--data.prompt_style", repr(self.prompt_style),
                f"one of {', '.join(PROMPT_STYLES)}")
        require(self.max_prompt_length is None or self.max_prompt_length >= 1, "--data.max_prompt_length",
                self.max_prompt_length, "a positive number of tokens or null")


@dataclass
class RolloutArgs:
    num_generations: int = 8  # G: completions sampled per prompt, a group
    max_new_tokens: int = 256  # a completion's length limit (TRL's max_completion_length)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    mask_truncated_completions: bool = False  # a completion cut off at max_new_tokens adds no loss (DAPO)
    batch_size: int | None = None  # sequences decoded together on a rank; None: all of the rank's at once
    decode_copy: bool | None = None  # sample from a decode-layout copy of the policy (RolloutCopy); None: CPU fp32

    def __post_init__(self):
        require(self.num_generations >= 2, "--rollout.num_generations", self.num_generations,
                "at least 2 (a group's mean is the baseline)")
        require(self.max_new_tokens >= 1, "--rollout.max_new_tokens", self.max_new_tokens, "a positive integer")
        require(self.temperature > 0, "--rollout.temperature", self.temperature, "a temperature > 0 (RL samples)")
        require(0 < self.top_p <= 1, "--rollout.top_p", self.top_p, "a probability in (0, 1]")
        require(self.top_k is None or self.top_k >= 1, "--rollout.top_k", self.top_k, "a positive integer or null")
        require(self.batch_size is None or self.batch_size >= 1, "--rollout.batch_size", self.batch_size,
                "a positive integer or null")


@dataclass
class LossArgs:
    type: str = "dapo"  # grpo, dr_grpo, dapo or bnpo: how the token losses are normalised (normalisation_weights)
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon; DAPO's clip-higher uses 0.28
    delta: float | None = None  # two-sided clipping (TRL's delta): the unclipped ratio is capped at delta (> 1 + eps)
    beta: float = 0.0  # weight of the k3 KL estimate to the reference; 0: no reference is loaded
    scale_rewards: str = "group"  # divide the advantages by the group's reward std, the batch's, or none (Dr. GRPO)
    num_iterations: int = 1  # mu: policy updates on each rollout (> 1: the ratio to the rollout's log-probs moves)

    def __post_init__(self):
        require(self.type in LOSS_TYPES, "--loss.type", repr(self.type), f"one of {', '.join(LOSS_TYPES)}")
        require(0 < self.epsilon < 1, "--loss.epsilon", self.epsilon, "a number in (0, 1)")
        require(self.epsilon_high is None or self.epsilon_high > 0, "--loss.epsilon_high", self.epsilon_high,
                "a positive number or null (= epsilon)")
        require(self.delta is None or self.delta > 1 + (self.epsilon_high or self.epsilon), "--loss.delta",
                self.delta, "null or a cap above 1 + epsilon_high")
        require(self.beta >= 0, "--loss.beta", self.beta, "a KL weight >= 0")
        require(self.scale_rewards in ("group", "batch", "none"), "--loss.scale_rewards", repr(self.scale_rewards),
                "group, batch or none")
        require(self.num_iterations >= 1, "--loss.num_iterations", self.num_iterations, "a positive integer")


@dataclass
class TrainArgs:
    prompts_per_step: int = 16  # prompts per step, all ranks together; each gives num_generations completions
    micro_batch_size: int = 8  # sequences (prompt + completion) per forward pass on one rank
    epochs: int | None = None  # passes over the training prompts...
    max_steps: int | None = 200  # ...or steps (the lower wins); a step is one rollout and num_iterations updates
    max_time: float | None = None  # ...or seconds of training (checkpoint and stop)
    lr: float = 1e-6
    min_lr: float = 0.0  # cosine decays to this
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    seed: int = 1337

    def __post_init__(self):
        for name in ("prompts_per_step", "micro_batch_size", "epochs", "max_steps"):
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
    interval: int = 25  # answer the val prompts greedily every this many steps (and at the end)
    max_prompts: int | None = None  # val prompts per validation, all ranks together; None: all
    log_completions: int = 2  # completions of each step written to out_dir/completions.jsonl (0: none)

    def __post_init__(self):
        require(self.interval >= 1, "--eval.interval", self.interval, "steps >= 1")
        require(self.max_prompts is None or self.max_prompts >= 1, "--eval.max_prompts", self.max_prompts,
                "a positive integer or null (all)")
        require(self.log_completions >= 0, "--eval.log_completions", self.log_completions, "a number >= 0")


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
    rollout: RolloutArgs = RolloutArgs(),
    loss: LossArgs = LossArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    rewards: list[str] = ["rewards:final_number"],  # noqa: B006 - read, never changed
    reward_weights: list[float] | None = None,
    lora: LoRAConfig | None = None,
    quantize: str | None = None,
    reference: str = "auto",
    reference_dir: Path | None = None,
    out_dir: Path = Path("out/grpo"),
    resume: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    logger: str = "csv",
    fast_dev_run: bool = False,
) -> None:
    """Train a checkpoint with reinforcement learning on verifiable rewards.

    Args:
        checkpoint_dir: the policy to start from (a checkpoint directory, or a LoRA adapter directory).
        data: the prompt files, prompt style and prompt length.
        rollout: completions per prompt, their length and sampling.
        loss: the objective's normalisation, clipping, KL weight, advantage scaling and updates per rollout.
        train: prompts per step, micro-batch size, stopping, optimizer and schedule.
        eval: validation interval and size, and how many completions per step go to completions.jsonl.
        checkpoint: checkpoint interval and retention.
        rewards: reward functions as module:function or path/file.py:function (TRL's signature; see rewards.py).
        reward_weights: one weight per reward function (default all 1); a completion's reward is the weighted sum.
        lora: train a LoRA/DoRA adapter with this config instead of every weight (e.g. --lora.r 16).
        quantize: with lora: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8 quantises the frozen base (QLoRA).
        reference: with --loss.beta > 0: copy (a frozen copy of reference_dir), base (with lora: the base alone, the
            adapter switched off; no second copy), or auto (base with lora, else copy).
        reference_dir: the reference checkpoint for copy; default checkpoint_dir.
        out_dir: where checkpoints, metrics.csv, completions.jsonl and final/ go.
        resume: "auto" (the newest complete step checkpoint in out_dir, if any) or a step directory.
        devices: devices per node.
        num_nodes: nodes (SLURM sets the rest).
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed.
        strategy: auto (one device) or ddp (each rank samples its share of the prompts' groups).
        activation_checkpointing: recompute each Block in the backward pass to save memory.
        logger: csv (always written), plus tensorboard or wandb when named.
        fast_dev_run: two steps with validation and a checkpoint, to smoke-test a config before a long run.
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
    # A rollout decodes a token at a time. Under FSDP2 every decode step would all-gather every layer's weights (a
    # collective per token, while each rank's completions stop at their own lengths): gathering the whole policy
    # for the rollout would cost a full copy per rank, which is what sharding was for. DDP holds it anyway.
    require(strategy in ("auto", "ddp"), "--strategy", repr(strategy), "auto or ddp (FSDP: not for rollouts yet)")
    require(reward_weights is None or len(reward_weights) == len(rewards), "--reward_weights", reward_weights,
            f"one weight per reward function ({len(rewards)})")
    if fast_dev_run:
        train.epochs, train.max_steps, train.max_time = None, 2, None
        eval.interval, eval.max_prompts, checkpoint.interval = 1, 2, 2
    # The resolved arguments, stored in every checkpoint's metadata so that it says how it was made
    run_args = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}
    reward_functions = load_reward_functions(rewards)  # before any work: a name that does not import is one line
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, **precision_args(precision),
                      strategy=make_strategy(strategy, devices, num_nodes), loggers=make_loggers(logger, out_dir))
    fabric.launch()
    main(fabric, checkpoint_dir=Path(checkpoint_dir), data=data, rollout=rollout, loss=loss, train=train, eval=eval,
         ckpt=checkpoint, reward_functions=reward_functions, reward_weights=reward_weights or [1.0] * len(rewards),
         lora=lora, quantize=quantize, reference=reference, reference_dir=Path(reference_dir or checkpoint_dir),
         out_dir=Path(out_dir), resume=resume, precision=precision, activation_checkpointing=activation_checkpointing,
         run_args=run_args)
    for logger in fabric.loggers:  # TensorBoard writes out and closes its event file
        logger.finalize("success")


def main(fabric, *, checkpoint_dir: Path, data: DataArgs, rollout: RolloutArgs, loss: LossArgs, train: TrainArgs,
         eval: EvalArgs, ckpt: CheckpointArgs, reward_functions: list, reward_weights: list[float],
         lora: LoRAConfig | None, quantize: str | None, reference: str, reference_dir: Path, out_dir: Path,
         resume: str | None, precision: str, activation_checkpointing: bool, run_args: dict) -> None:
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
    world, G = fabric.world_size, rollout.num_generations
    if train.prompts_per_step % world:
        raise InputError(f"--train.prompts_per_step {train.prompts_per_step} must be a multiple of the world size "
                         f"{world} (each rank samples the groups of its share of the prompts)")
    max_prompt_length = data.max_prompt_length or config.block_size - rollout.max_new_tokens
    if max_prompt_length < 1 or max_prompt_length + rollout.max_new_tokens > config.block_size:
        raise InputError(f"--data.max_prompt_length {max_prompt_length} + --rollout.max_new_tokens "
                         f"{rollout.max_new_tokens} must fit the model's block_size {config.block_size}")
    train_set, val_set = load_data(fabric, data, tokenizer, max_prompt_length, train.seed)
    if len(train_set) < train.prompts_per_step:
        raise InputError(f"{len(train_set)} training prompts, fewer than one --train.prompts_per_step "
                         f"({train.prompts_per_step})")
    sampler = StepSampler(len(train_set), train.prompts_per_step, train.prompts_per_step // world, fabric.global_rank,
                          world, train.seed)
    limits = [s for s in (train.epochs and train.epochs * sampler.steps_per_epoch, train.max_steps) if s]
    if not limits:  # the cosine schedule needs an end; --train.max_time alone cannot give one
        raise InputError("set --train.epochs or --train.max_steps")
    max_steps = min(limits)
    stop_ids = tokenizer.stop_ids
    pad_id = next((i for i in (tokenizer.token_to_id(tokenizer.pad_token), tokenizer.eos_id) if i is not None), 0)

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
    reference_model = None
    if loss.beta > 0:
        if reference == "auto":  # an SFT adapter's reference is the SFT model: the base with it on
            reference = "base" if lora is not None and not start_adapter else "copy"
        if reference == "base" and start_adapter:
            raise InputError(f"--reference base: {checkpoint_dir} is an adapter, and its base alone is not the model "
                             "being trained; use --reference copy")
        if reference == "copy":
            reference_model = load_frozen(reference_dir, fabric.device, weights_dtype(precision))
            if {**asdict(reference_model.config), "name": ""} != {**asdict(config), "name": ""}:
                raise InputError(f"--reference_dir {reference_dir}: another model ({reference_model.config.name}) "
                                 f"than --checkpoint_dir {checkpoint_dir} ({config.name})")
    # auto: where the layout pays, float32 weights on a CPU (bf16 matrices are left row-major, generation.py)
    decode_copy = rollout.decode_copy if rollout.decode_copy is not None else \
        fabric.device.type == "cpu" and weights_dtype(precision) == torch.float32
    rows = rollout.batch_size or train.prompts_per_step // world * G  # sequences a rollout decodes together
    rollout_copy = RolloutCopy(model, fabric.device, rows) if decode_copy and not quantize else None
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    trained = lora_summary(model) if lora is not None else \
        f"{sum(p.numel() for p in model.parameters()):,} parameters, all trained"
    fabric.print(f"{config.name}{' ' + quantize if quantize else ''}: {trained}; loss {loss.type}, "
                 f"{train.prompts_per_step} prompts x {G} completions per step, {loss.num_iterations} update(s) each; "
                 f"rewards {', '.join(name for name, _ in reward_functions)}; KL "
                 f"{f'{loss.beta} to the ' + reference if loss.beta > 0 else 'none'}; {world} rank(s), {max_steps} "
                 f"steps ({sampler.steps_per_epoch} per epoch)")
    # the weights are made: from here on each rank draws its own dropout masks (rollouts draw from generators of their
    # own, one per prompt, seeded by the step and the prompt's place in it)
    seed_ranks(fabric, train.seed)
    model = fabric.setup_module(model)
    raw_model = model.module  # unwrapped: its parameter names carry no wrapper prefix, in groups and checkpoints
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model, train.lr, train.weight_decay, train.betas,
                                                       fabric.device))

    def rollout_model():
        """The model to sample from: the policy itself, or its decode-layout copy with the current weights."""
        if rollout_copy is None:
            return raw_model
        rollout_copy.sync(raw_model)
        return rollout_copy.model

    state = dict(step=0, tokens=0, train_time=0.0)
    resume_dir = find_resume_dir(fabric, out_dir, resume)
    if resume_dir is not None:
        load_training_state(fabric, resume_dir, raw_model, optimizer, sampler, state, lora is not None)
        fabric.print(f"resumed from {resume_dir} at step {state['step']}")

    names = [name for name, _ in reward_functions]
    columns = ["step", "epoch", "tokens", "loss", "reward", "reward_std", "frac_reward_zero_std",
               *[f"rewards/{n}/{s}" for n in names for s in ("mean", "std")], "completions/mean_length",
               "completions/min_length", "completions/max_length", "completions/clipped_ratio",
               "completions/mean_terminated_length", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "sampling/sampling_logp_difference/mean", "val_reward",
               *[f"val_rewards/{n}/mean" for n in names], "lr", "rollout_s", "update_s", "tokens_per_sec", "sample"]
    metrics = MetricsCSV(out_dir / "metrics.csv", columns, fabric.global_rank == 0, truncate_after_step=state["step"])
    completions_log = CompletionsLog(out_dir / "completions.jsonl", fabric.global_rank == 0, state["step"])
    if state["step"] == 0 and len(val_set):  # where the held-out reward starts: a row of its own, step 0
        val = validate(fabric, rollout_model(), val_set, eval.max_prompts, rollout, reward_functions, reward_weights,
                       stop_ids, pad_id, tokenizer)
        metrics.log(dict(step=0, epoch=0.0, tokens=0, **val["metrics"]))
        fabric.log_dict({k: v for k, v in val["metrics"].items() if v is not None}, step=0)
        fabric.print(f"step 0: val_reward {val['metrics']['val_reward']}; {val['example']}")
    stop_signal = StopSignal(fabric)
    progress = tqdm(total=max_steps, initial=state["step"], disable=fabric.global_rank != 0, desc="grpo",
                    dynamic_ncols=True)
    for step in range(state["step"] + 1, max_steps + 1):
        last_step = step == max_steps
        lr = lr_at(step, train.lr, train.min_lr, train.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()

        # -- rollout: G completions of each of this rank's prompts, scored --
        (prompt_ids,) = sampler.next_step()  # this rank's prompts
        prompts = [train_set[i] for i in prompt_ids for _ in range(G)]  # group-contiguous: G rows per prompt
        # each group draws from its own generator, seeded by the step and the prompt's place in it: the same
        # completions whatever the number of ranks, and on resume
        first = fabric.global_rank * len(prompt_ids)
        generators = [torch.Generator(fabric.device).manual_seed(hash((train.seed, step, first + k)))
                      for k in range(len(prompt_ids))]
        samples = sample_completions(fabric, rollout_model(), [p["ids"] for p in prompts], rollout, stop_ids, pad_id,
                                     generators=[g for g in generators for _ in range(G)], group_size=G)
        texts = [tokenizer.decode(s["ids"], skip_special_tokens=True) for s in samples]
        rewards_per_fn = score(reward_functions, prompts, texts, [s["ids"] for s in samples], rollout.max_new_tokens)
        truncated = torch.tensor([s["truncated"] for s in samples])
        lengths = torch.tensor([len(s["ids"]) for s in samples])
        counted = torch.where(truncated & rollout.mask_truncated_completions, 0, lengths)
        # every rank's rows, in rank order: the baseline, the scales and the normalisation are the whole step's
        prompt_lengths = torch.tensor([len(p["ids"]) for p in prompts])
        local = torch.cat([rewards_per_fn, torch.stack([lengths, truncated, counted, prompt_lengths], 1).float()], 1)
        everything = gather_rows(fabric, local)
        all_rewards_per_fn, (all_lengths, all_truncated, all_counted, all_prompt_lengths) = \
            everything[:, :len(names)], everything[:, len(names):].T
        all_rewards = weighted_rewards(all_rewards_per_fn, reward_weights)
        all_advantages, all_std, std_is_zero = group_advantages(all_rewards, G, loss.scale_rewards)
        all_token_weights = normalisation_weights(loss.type, all_counted, G, rollout.max_new_tokens)
        mine = slice(fabric.global_rank * len(samples), (fabric.global_rank + 1) * len(samples))
        rows = [dict(prompt_ids=p["ids"], ids=s["ids"], sampler_logps=s["logps"], advantage=a, weight=w,
                     counted=bool(c)) for p, s, a, w, c in
                zip(prompts, samples, all_advantages[mine].tolist(), all_token_weights[mine].tolist(),
                    counted.tolist())]
        rollout_time = time.perf_counter() - step_start

        # -- num_iterations updates on the rollout --
        update_start = time.perf_counter()
        batches = [collate_rollout(rows[i:i + train.micro_batch_size], pad_id)
                   for i in range(0, len(rows), train.micro_batch_size)]
        with torch.no_grad():
            for batch in batches:
                if loss.num_iterations > 1:  # the rollout policy's log-probs, which later iterations move away from
                    batch["old_logps"] = token_logps(fabric, raw_model, batch, rollout.temperature)
                if loss.beta > 0:
                    if reference_model is not None:
                        batch["ref_logps"] = token_logps(fabric, reference_model, batch, rollout.temperature)
                    else:
                        with lora_disabled(raw_model):
                            batch["ref_logps"] = token_logps(fabric, raw_model, batch, rollout.temperature)
        sums = torch.zeros(len(SUMS), device=fabric.device)  # the step's statistics, all iterations and ranks
        for iteration in range(loss.num_iterations):
            iteration_sums = torch.zeros(len(SUMS), device=fabric.device)
            for i, batch in enumerate(batches):
                with fabric.no_backward_sync(model, enabled=i < len(batches) - 1):
                    objective, stats = policy_loss(fabric, model, batch, loss, rollout.temperature,
                                                   first_iteration=iteration == 0)
                    fabric.backward(objective * world)  # x world size: DDP averages the ranks' gradients
                iteration_sums += stats
            iteration_sums = fabric.all_reduce(iteration_sums, reduce_op="sum")
            if not math.isfinite(iteration_sums[0].item()):
                raise InputError(f"loss is {iteration_sums[0].item()} at step {step}; the last good checkpoint in "
                                 f"{out_dir} is kept (try a lower --train.lr or --train.grad_clip)")
            if train.grad_clip:
                clip_gradients(fabric, model, optimizer, train.grad_clip, step, out_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums += iteration_sums
        update_time = time.perf_counter() - update_start

        step_time = time.perf_counter() - step_start
        state["step"] = step
        state["tokens"] += int(all_prompt_lengths.sum() + all_lengths.sum())  # every rank's prompts and completions
        state["train_time"] += step_time
        row = dict(step=step, epoch=round(sampler.epochs_done, 4), tokens=state["tokens"],
                   **summarise(sums, loss), **rollout_metrics(all_rewards_per_fn, all_rewards, all_std, std_is_zero,
                                                            all_lengths, all_truncated, names),
                   lr=lr, rollout_s=rollout_time, update_s=update_time,
                   tokens_per_sec=float(all_lengths.sum()) / rollout_time)
        row["sample"] = f"[{all_rewards[0].item():.2f}] {texts[0]}"
        completions_log.write(step, [dict(prompt=p["prompt"], completion=t, advantage=r["advantage"],
                                          rewards=dict(zip(names, [None if math.isnan(v) else v for v in rs])))
                                     for p, r, t, rs in zip(prompts, rows, texts, rewards_per_fn.tolist())
                                     ][:eval.log_completions])
        if (step % eval.interval == 0 or last_step) and len(val_set):
            val = validate(fabric, rollout_model(), val_set, eval.max_prompts, rollout, reward_functions, reward_weights,
                           stop_ids, pad_id, tokenizer)
            row.update(val["metrics"])
            if fabric.global_rank == 0:
                tqdm.write(f"step {step}: val_reward {row['val_reward']:.3f}; {val['example']}")
        progress.update(1)
        progress.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['completions/mean_length']:.0f}",
                             roll_s=f"{rollout_time:.1f}", upd_s=f"{update_time:.1f}")
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


# ---- rewards and advantages -----------------------------------------------------------------------------------------

def load_reward_functions(names: list[str]) -> list[tuple[str, Callable]]:
    """(name, function) for each module:function or path/file.py:function; a bad name is one line naming it."""
    if not names:
        raise InputError("--rewards: name at least one reward function (module:function, e.g. rewards:final_number)")
    functions = []
    for spec in names:
        module_name, _, function_name = str(spec).rpartition(":")
        if not module_name or not function_name.isidentifier():
            raise InputError(f"--rewards: {spec!r}: expected module:function or path/file.py:function")
        try:
            if module_name.endswith(".py"):
                path = Path(module_name)
                if not path.is_file():
                    raise InputError(f"--rewards: {spec!r}: no file {path}")
                module_spec = importlib.util.spec_from_file_location(f"reward_module_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's module failing to import, in whatever way
            raise InputError(f"--rewards: {spec!r}: importing {module_name} failed ({type(e).__name__}: {e})") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise InputError(f"--rewards: {spec!r}: {module_name} has no function {function_name}")
        if function_name in [n for n, _ in functions]:
            raise InputError(f"--rewards: two reward functions named {function_name}; their metrics would collide")
        functions.append((function_name, function))
    return functions


def score(reward_functions: list, prompts: list[dict], texts: list[str], completion_ids: list[list[int]],
          max_completion_length: int) -> torch.Tensor:
    """(completions, functions) float32 rewards, NaN where a function returned None. Each function is called as TRL
    calls it: prompts as the records hold them, completions in TRL's form (chat messages for a chat prompt), and
    every other field of the records as a keyword argument with one value per completion."""
    keys = sorted({k for p in prompts for k in p["fields"]})
    fields = {k: [p["fields"].get(k) for p in prompts] for k in keys}
    completions = [[{"role": "assistant", "content": t}] if isinstance(p["prompt"], list) else t
                   for p, t in zip(prompts, texts)]
    columns = []
    for name, function in reward_functions:
        try:
            values = function(prompts=[p["prompt"] for p in prompts], completions=completions,
                              completion_ids=completion_ids, **fields, max_completion_length=max_completion_length)
        except Exception as e:  # noqa: BLE001 - whatever the user's function raises, it is named, never a zero
            raise InputError(f"reward function {name} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(texts) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            raise InputError(f"reward function {name} returned {str(values)[:60]!r}: expected a list of "
                             f"{len(texts)} numbers or None")
        columns.append([float("nan") if v is None else float(v) for v in values])
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(texts), len(reward_functions))


def weighted_rewards(rewards_per_fn: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """(completions, functions) -> each completion's reward, the weighted sum of the functions that apply to it (TRL's
    nansum); NaN where none applies, so that it is left out of its group's baseline and gets no advantage."""
    total = (rewards_per_fn * torch.tensor(weights)).nansum(1)
    total[rewards_per_fn.isnan().all(1)] = float("nan")
    return total


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation of the values that are not NaN (as TRL's nanstd)."""
    if dim is None:
        return nanstd(x.flatten(), 0)
    keep = ~x.isnan()
    squares = torch.where(keep, (x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2, 0)
    return (squares.sum(dim) / (keep.sum(dim) - 1)).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards (N,), groups of group_size consecutive completions -> (advantages, the std each is scaled by, whether
    that std is zero), each (N,): the reward minus its group's mean, divided by the group's std (scale "group", GRPO),
    the batch's ("batch") or not at all ("none", Dr. GRPO), + 1e-4 as TRL. NaN rewards (nothing applies) are left
    out of the means and get advantage 0."""
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std, torch.isclose(std, torch.zeros_like(std))


def normalisation_weights(loss_type: str, counted: torch.Tensor, group_size: int,
                          max_completion_length: int) -> torch.Tensor:
    """counted (N,): each completion's tokens in the loss (0 for a masked one), the whole step's -> the weight of each
    of its tokens in the step's loss, (N,), so that the loss is sum_i weight_i sum_t loss_it over every rank and
    micro-batch, whatever the split:
        grpo     1 / (|o_i| N)             each completion's mean token loss, then the mean over completions
        dr_grpo  1 / (N L_max)             the sum over a constant length (Dr. GRPO: no length bias)
        dapo     1 / sum_j |o_j|           token-level over the whole step (DAPO)
        bnpo     1 / (|group| n_groups)    token-level within each prompt's group, then the mean over groups
    (TRL's bnpo normalises over a device's micro-batch, which changes with the split; here the unit is the group.)"""
    n = len(counted)
    counted = counted.to(torch.promote_types(counted.dtype, torch.float32))
    if loss_type == "grpo":
        return 1 / (counted.clamp(min=1) * n)
    if loss_type == "dr_grpo":
        return torch.full_like(counted, 1 / (n * max_completion_length))
    if loss_type == "dapo":
        return torch.full_like(counted, 1 / max(float(counted.sum()), 1.0))
    if loss_type == "bnpo":
        group_tokens = counted.view(-1, group_size).sum(1).clamp(min=1).repeat_interleave(group_size)
        return 1 / (group_tokens * (n // group_size))
    raise ValueError(f"unknown loss type {loss_type!r}")


def rollout_metrics(rewards_per_fn: torch.Tensor, rewards: torch.Tensor, std: torch.Tensor, std_is_zero: torch.Tensor,
                    lengths: torch.Tensor, truncated: torch.Tensor, names: list[str]) -> dict:
    """The step's rollout metrics, TRL's names, over every rank's completions."""
    def value(x: torch.Tensor) -> float | None:
        return None if x.isnan() else x.item()

    row = {"reward": value(torch.nanmean(rewards)), "reward_std": value(nanstd(rewards)),
           "frac_reward_zero_std": std_is_zero.float().mean().item()}
    for i, name in enumerate(names):
        row[f"rewards/{name}/mean"] = value(torch.nanmean(rewards_per_fn[:, i]))
        row[f"rewards/{name}/std"] = value(nanstd(rewards_per_fn[:, i]))
    terminated = lengths[truncated == 0]
    row.update({"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.mean().item(),
                "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else 0.0})
    return row


# ---- rollouts -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_completions(fabric, raw_model, prompts: list[list[int]], rollout: RolloutArgs, stop_ids: list[int],
                       pad_id: int, temperature: float | None = None,
                       generators: list[torch.Generator] | None = None, group_size: int = 1) -> list[dict]:
    """Each prompt's completion: {"ids": its tokens, up to and with the stop token that ended it; "logps": the
    sampler's log-prob of each (float32); "truncated": no stop token within max_new_tokens}. Batches of
    rollout.batch_size rows, left-padded, through the KV cache; row i draws from generators[i] (generation.sample).
    group_size: the prompts come in runs of that many identical ones, each run prefilled once (generate_tokens).
    temperature 0: greedy (validation)."""
    raw_model.eval()
    samples = []
    size = rollout.batch_size or len(prompts)
    if size % group_size:  # a batch that splits a run prefills each row alone
        group_size = 1
    temperature = rollout.temperature if temperature is None else temperature
    for start in range(0, len(prompts), size):
        chunk, logps, steps = prompts[start:start + size], [], []
        with fabric.autocast():
            for tokens in generate_tokens(raw_model, chunk, rollout.max_new_tokens, temperature=temperature,
                                          top_k=rollout.top_k, top_p=rollout.top_p, stop_ids=stop_ids, pad_id=pad_id,
                                          logprobs=logps, generator=generators and generators[start:start + size],
                                          group_size=group_size):
                steps.append(tokens)
        tokens, logps = torch.stack(steps, 1).tolist(), torch.stack(logps, 1).float().cpu()
        for row, ids in enumerate(tokens):
            end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
            n = len(ids) if end is None else end + 1  # the stop token stays: the policy learns when to stop
            samples.append(dict(ids=ids[:n], logps=logps[row, :n], truncated=end is None))
    raw_model.clear_kv_cache()  # training runs without a cache
    raw_model.train()
    return samples


class RolloutCopy:
    """A second copy of the policy's weights, laid out for decoding `rows` sequences together
    (generation.use_decode_layout: on a CPU in float32 every matrix in huge pages, q/k/v and gate/up stacked; on a GPU
    the stacking alone), which rollouts and validation sample from. Training cannot use that layout (the stacked
    matrices are not the Parameters the optimizer updates), so the copy is refreshed from the policy before each
    rollout, an adapter merged in: one more set of weights in memory and a copy per step, for a decode step ~1.5x
    faster on a CPU (bench/RESULTS.md).
    Not for a quantised base, whose float copy would cost 4-8x its memory: that one samples from the policy."""

    def __init__(self, model, device, rows: int):
        self.model = copy.deepcopy(model)
        merge_lora(self.model)  # plain Linears: the adapter folded in, refreshed in sync
        self.model = use_decode_layout(self.model.to(device).requires_grad_(False).eval(), rows)

    @torch.no_grad()
    def sync(self, policy) -> None:
        """Copy the policy's current weights in (in place: the layout stays), each adapter merged into its layer."""
        targets = dict(self.model.named_parameters())
        merged = {f"{name}.weight".replace("_checkpoint_wrapped_module.", ""): module.merged().weight
                  for name, module in policy.named_modules() if isinstance(module, LoRALinear)}
        for name, p in policy.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "")
            if name in targets:
                targets[name].copy_(merged.get(name, p))


def collate_rollout(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows: input_ids and labels (tokens[:-1], tokens[1:]) with IGNORE_INDEX
    outside the completion; loss_mask (a completion's targets, unless masked as truncated), each row's advantage and
    token weight, and the sampler's log-probs at the label positions."""
    T = max(len(r["prompt_ids"]) + len(r["ids"]) for r in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    sampler_logps = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        tokens, P, C = r["prompt_ids"] + r["ids"], len(r["prompt_ids"]), len(r["ids"])
        input_ids[i, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        labels[i, P - 1:P - 1 + C] = torch.tensor(r["ids"])  # completion token j is the target at position P-1+j
        sampler_logps[i, P - 1:P - 1 + C] = r["sampler_logps"]
    counted = torch.tensor([r["counted"] for r in rows])
    return dict(input_ids=input_ids, labels=labels, loss_mask=(labels != IGNORE_INDEX) & counted[:, None],
                advantages=torch.tensor([r["advantage"] for r in rows]),
                weights=torch.tensor([r["weight"] for r in rows]),
                sampler_logps=sampler_logps)


# ---- the objective --------------------------------------------------------------------------------------------------

# What a micro-batch adds to the step's statistics, summed over micro-batches, iterations and ranks
SUMS = ["loss", "tokens", "entropy", "kl", "low_clipped", "high_clipped", "region_clipped",
        "sampling_diff", "sampling_tokens"]


def token_logps(fabric, model, batch: dict, temperature: float, entropy: bool = False):
    """Each label's log-prob under softmax(logits / temperature), (rows, T) float32, 0 where ignored (and with entropy,
    each position's entropy too). Under the run's autocast also for a model Fabric did not wrap."""
    x, y = batch["input_ids"].to(fabric.device), batch["labels"].to(fabric.device)
    with fabric.autocast():
        return model(x, targets=y, per_token=True, temperature=temperature, entropy=entropy)


def policy_loss(fabric, model, batch: dict, loss: LossArgs, temperature: float,
                first_iteration: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's share of the step's loss, sum_i weight_i sum_t loss_it with its gradient, and its statistics
    (SUMS) detached. loss_it = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps_high) A_i) + beta KL_t, ratio =
    pi(o_t) / pi_old(o_t) (pi_old: the rollout's policy, this very one at the first of one iteration), KL_t the k3
    estimate exp(ref - logp) - (ref - logp) - 1 (Schulman 2020), as TRL's GRPOTrainer."""
    device = fabric.device
    logps, entropies = token_logps(fabric, model, batch, temperature, entropy=True)
    mask = batch["loss_mask"].to(device)
    old = batch["old_logps"].to(device) if "old_logps" in batch else logps.detach()
    advantages = batch["advantages"].to(device)[:, None]
    ratio = torch.exp(logps - old)
    low_bound, high_bound = 1 - loss.epsilon, 1 + (loss.epsilon_high or loss.epsilon)
    clipped = torch.clamp(ratio, low_bound, high_bound)
    capped = ratio if loss.delta is None else torch.clamp(ratio, max=loss.delta)
    token_losses = -torch.min(capped * advantages, clipped * advantages)
    kl = None
    if loss.beta > 0:
        difference = batch["ref_logps"].to(device) - logps
        kl = torch.exp(difference) - difference - 1
        token_losses = token_losses + loss.beta * kl
    objective = (token_losses * mask * batch["weights"].to(device)[:, None]).sum()

    masked = mask.float()
    low = (ratio < low_bound) & (advantages < 0)
    high = (ratio > high_bound) & (advantages > 0)
    targets = batch["labels"].to(device) != IGNORE_INDEX
    stats = dict.fromkeys(SUMS, torch.zeros((), device=device))
    stats.update(loss=objective.detach(), tokens=masked.sum(), entropy=(entropies * masked).sum(),
                 low_clipped=(low * masked).sum(), high_clipped=(high * masked).sum(),
                 region_clipped=((low | high) * masked).sum())
    if kl is not None:
        stats["kl"] = (kl.detach() * masked).sum()
    if first_iteration:  # how far the sampler's log-probs are from the trainer's (KV-cache decode vs full forward)
        difference = (batch["sampler_logps"].to(device) - logps.detach()).abs()
        stats.update(sampling_diff=(difference * targets).sum(), sampling_tokens=targets.sum().float())
    return objective, torch.stack([stats[k].float().reshape(()) for k in SUMS])


def summarise(sums: torch.Tensor, loss: LossArgs) -> dict:
    """The step's loss metrics, TRL's names, from the statistics summed over micro-batches, iterations and ranks."""
    s = dict(zip(SUMS, sums.tolist()))
    tokens = max(s["tokens"], 1)
    return {"loss": s["loss"] / loss.num_iterations, "entropy": s["entropy"] / tokens,
            "kl": s["kl"] / tokens if loss.beta > 0 else None, "clip_ratio/low_mean": s["low_clipped"] / tokens,
            "clip_ratio/high_mean": s["high_clipped"] / tokens, "clip_ratio/region_mean": s["region_clipped"] / tokens,
            "sampling/sampling_logp_difference/mean": s["sampling_diff"] / max(s["sampling_tokens"], 1)}


@torch.no_grad()
def validate(fabric, raw_model, val_set: list[dict], max_prompts: int | None, rollout: RolloutArgs,
             reward_functions: list, reward_weights: list[float], stop_ids: list[int], pad_id: int,
             tokenizer: Tokenizer) -> dict:
    """Greedy answers to the val prompts (the first max_prompts, split over the ranks), scored: val_reward (the
    weighted sum's mean) and val_rewards/<fn>/mean, and one answer to show."""
    prompts = val_set[:max_prompts or len(val_set)][fabric.global_rank::fabric.world_size]
    F = len(reward_functions)
    sums = torch.zeros(2 * F + 2, device=fabric.device)  # per function: sum, count; then the total: sum, count
    example = ""
    if prompts:
        samples = sample_completions(fabric, raw_model, [p["ids"] for p in prompts], rollout, stop_ids, pad_id,
                                     temperature=0.0)
        texts = [tokenizer.decode(s["ids"], skip_special_tokens=True) for s in samples]
        per_fn = score(reward_functions, prompts, texts, [s["ids"] for s in samples], rollout.max_new_tokens)
        total = weighted_rewards(per_fn, reward_weights)
        for i in range(F):
            column = per_fn[:, i]
            sums[2 * i], sums[2 * i + 1] = column.nansum(), (~column.isnan()).sum()
        sums[2 * F], sums[2 * F + 1] = total.nansum(), (~total.isnan()).sum()
        example = f"{tokenizer.decode(prompts[0]['ids'], skip_special_tokens=True)!r} -> {texts[0]!r} [{total[0]:.2f}]"
    sums = fabric.all_reduce(sums, reduce_op="sum").tolist()

    def mean(i: int) -> float | None:
        return sums[i] / sums[i + 1] if sums[i + 1] else None

    names = [name for name, _ in reward_functions]
    return dict(metrics={"val_reward": mean(2 * F), **{f"val_rewards/{n}/mean": mean(2 * i) for i, n in
                                                        enumerate(names)}}, example=example)


def gather_rows(fabric, local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (equal counts), concatenated in rank order, on the CPU."""
    if fabric.world_size == 1:
        return local
    return fabric.all_gather(local.to(fabric.device)).flatten(0, 1).cpu()


# ---- data, logs, checkpoints ----------------------------------------------------------------------------------------

def load_data(fabric, data: DataArgs, tokenizer: Tokenizer, max_prompt_length: int,
              seed: int) -> tuple[list[dict], list[dict]]:
    if not data.train_files:
        raise InputError("--data.train_files: name the JSON or JSONL prompt files to train on")
    if data.val_files and data.val_split:
        raise InputError("--data.val_split: give it or --data.val_files, not both")
    style = data.prompt_style
    if style == "auto":
        style = "chat_template" if tokenizer.chat_template else "plain"
    elif style == "chat_template" and not tokenizer.chat_template:
        raise InputError("--data.prompt_style chat_template: this tokenizer has no chat template; use plain")
    records = read_prompt_records(data.train_files)
    records, val_records = (records, read_prompt_records(data.val_files)) if data.val_files else \
        hold_out(records, data.val_split, seed)
    dropped = 0
    train_set, val_set = [], []
    for dataset, split in ((train_set, records), (val_set, val_records)):
        for where, prompt, fields in split:
            ids = render_prompt(where, prompt, tokenizer, style)
            if len(ids) > max_prompt_length:
                dropped += 1
                continue
            dataset.append(dict(prompt=prompt, ids=ids, fields=fields))
    if not train_set:
        raise InputError(f"{data.train_files}: no training prompts left ({dropped} longer than {max_prompt_length} "
                         "tokens; raise --data.max_prompt_length or lower --rollout.max_new_tokens)")
    fabric.print(f"{len(train_set):,} train and {len(val_set):,} val prompts, prompt style {style}; {dropped:,} "
                 f"dropped (longer than {max_prompt_length} tokens)")
    return train_set, val_set


def read_prompt_records(paths: str | Path | list) -> list[tuple[str, str | list[dict], dict]]:
    """(where, prompt as the record holds it, the record's other fields) of every record, checked."""
    records = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path, count = Path(path), 0
        for line, record in read_json_records(path):
            where = f"{path}:{line}"
            if not isinstance(record, dict) or "prompt" not in record:
                raise DataError(f"{where}: expected a record with a 'prompt' field (a string or chat messages)")
            prompt = record["prompt"]
            if not (isinstance(prompt, str) and prompt):
                to_prompt(prompt, where)  # a list of messages, checked; anything else is one line naming the field
            records.append((where, prompt, {k: v for k, v in record.items() if k != "prompt"}))
            count += 1
        if not count:
            raise DataError(f"{path}: no records; expected a JSON list of prompt records or one JSON object per line")
    return records


def render_prompt(where: str, prompt: str | list[dict], tokenizer: Tokenizer, style: str) -> list[int]:
    """The prompt's token ids: the chat template's rendering with the assistant's turn opened, the Alpaca prompt, or
    (plain) the text itself after bos, as a base model continues it."""
    if style == "plain":
        if not isinstance(prompt, str):
            raise DataError(f"{where}: prompt style plain needs a string prompt, not chat messages")
        return tokenizer.encode(prompt, bos=True, eos=False)
    try:
        return encode_prompt(prompt, tokenizer, style)
    except InputError as e:
        raise DataError(f"{where}: {e}") from None


class CompletionsLog:
    """out_dir/completions.jsonl: a few completions of each step with their rewards and advantage, one JSON line
    each. On resume the lines after the resumed step are dropped, like metrics.csv's rows."""

    def __init__(self, path: Path, enabled: bool, truncate_after_step: int):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and truncate_after_step > 0:
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= truncate_after_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, entries: list[dict]) -> None:
        if self.enabled and entries:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(dict(step=step, **e)) + "\n" for e in entries)


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
