"""grpo.py and rewards.py: group advantages, each loss type's normalisation against a hand computation, the gradient at
one iteration against REINFORCE with a group baseline in float64, clip fractions on a hand-made batch, the loss
independent of the micro-batch split, a tiny model learning a toy reward in float32 and bfloat16, exact resume, the
KL to a reference, and bad input as one line."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import CLI

import grpo
import rewards
from checkpoint import load_lora_model, load_model, save_checkpoint
from conftest import ROOT
from data_prep import train_tokenizer
from model import GPT, IGNORE_INDEX, Config, InputError
from test_finetune import write_jsonl

VOCAB, BLOCK = 320, 64
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]
TARGETS = range(100, 132)  # the toy reward: the share of a completion's tokens in this tenth of the vocabulary
TOY_REWARDS = f"""
def share(prompts, completions, completion_ids, **fields):
    return [sum(t in range({TARGETS.start}, {TARGETS.stop}) for t in ids) / len(ids) for ids in completion_ids]


def broken(prompts, completions, completion_ids, **fields):
    raise KeyError("answer")


def too_few(prompts, completions, completion_ids, **fields):
    return [1.0]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    write_jsonl(root / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"What colour is {n}'s hat?"}]
                                          if i % 2 else f"Where is {n}?", "answer": str(i)}
                                         for i, n in enumerate(NAMES)])
    (root / "toy.py").write_text(TOY_REWARDS)
    (root / "corpus").mkdir()
    text = "\n".join(f"What colour is {n}'s hat? Where is {n}? {n}'s hat is red." for n in NAMES)
    (root / "corpus" / "chat.txt").write_text(3 * (text + "\nuser assistant\n"))
    train_tokenizer.main(inputs=str(root / "corpus"), out_dir=root / "base", vocab_size=VOCAB)
    config_file = root / "base" / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK)
    save_checkpoint(root / "base", config, GPT(config).state_dict(), tokenizer_dir=root / "base")
    return root


def args_of(tiny: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint_dir", str(tiny / "base"), "--data.train_files", str(tiny / "prompts.jsonl"),
            "--data.val_split", "0.2", "--out_dir", str(out_dir), "--rewards", f"[{tiny / 'toy.py'}:share]",
            "--rollout.num_generations", "4", "--rollout.max_new_tokens", "6", "--train.prompts_per_step", "2",
            "--train.micro_batch_size", "4", "--train.max_steps", "3", "--train.lr", "1e-2", "--train.min_lr",
            "1e-2", "--eval.interval", "2", "--checkpoint.interval", "2", *extra]


def run(tiny: Path, out_dir: Path, *extra: str) -> list[dict]:
    """grpo.py's command line in this process, one thread (tiny models), and the metrics it wrote."""
    sigusr1, threads = signal.getsignal(signal.SIGUSR1), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        CLI(grpo.setup, args=args_of(tiny, out_dir, *extra), exit_on_error=False)
    finally:  # the run's SIGUSR1 handler (training.StopSignal) goes with it
        signal.signal(signal.SIGUSR1, sigusr1)
        torch.set_num_threads(threads)
    with open(out_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["step"] != "0"]  # step 0: the held-out reward before training


# ---- advantages, normalisation, the objective --------------------------------------------------------------------

def test_group_advantages_sum_to_zero_per_group_and_scale_as_trl():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, float("nan")])
    advantages, std, zero = grpo.group_advantages(rewards, 4, "group")
    assert advantages.view(3, 4).sum(1).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    # by hand (float64): (r - mean) / (unbiased std + 1e-4); the NaN row is out of its group's statistics, advantage 0
    group0 = [1.0, 0.0, 0.0, 1.0]
    s0 = math.sqrt(sum((r - 0.5) ** 2 for r in group0) / 3)
    assert advantages[:4].tolist() == pytest.approx([(r - 0.5) / (s0 + 1e-4) for r in group0], rel=1e-6)
    assert advantages[4:8].tolist() == [0.0] * 4 and zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    s2 = math.sqrt(((2 - 1) ** 2 + (0 - 1) ** 2 + 0) / 2)
    assert advantages[8:].tolist() == pytest.approx([1 / (s2 + 1e-4), -1 / (s2 + 1e-4), 0.0, 0.0], rel=1e-6)
    unscaled, _, _ = grpo.group_advantages(rewards, 4, "none")  # Dr. GRPO: centred only
    assert unscaled[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    batch, batch_std, _ = grpo.group_advantages(rewards, 4, "batch")  # one std over every scorable reward
    kept = [r for r in rewards.tolist() if not math.isnan(r)]
    m = sum(kept) / len(kept)
    expected = math.sqrt(sum((r - m) ** 2 for r in kept) / (len(kept) - 1))
    assert batch_std[0].item() == pytest.approx(expected, rel=1e-6)
    assert batch[:4].tolist() == pytest.approx([(r - 0.5) / (expected + 1e-4) for r in group0], rel=1e-6)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_each_loss_type_normalises_as_its_definition(loss_type):
    """sum_i weight_i sum_t l_it, the way grpo.py adds a step up over micro-batches and ranks, against each
    definition written out in float64 (2 groups of 3; one completion masked as truncated, counting 0 tokens)."""
    torch.manual_seed(0)
    lengths = [3, 5, 2, 4, 1, 6]
    counted = torch.tensor([3, 5, 0, 4, 1, 6])
    token_losses = [[float(torch.randn(())) for _ in range(n)] for n in lengths]
    L_max, N = 8, 6
    weights = grpo.normalisation_weights(loss_type, counted, 3, L_max).double()
    ours = sum(weights[i].item() * sum(token_losses[i]) for i in range(N) if counted[i])
    sums = [sum(t) if c else 0.0 for t, c in zip(token_losses, counted.tolist())]
    if loss_type == "grpo":  # the mean over completions of each one's mean token loss
        expected = sum(s / max(c, 1) for s, c in zip(sums, counted.tolist())) / N
    elif loss_type == "dr_grpo":  # the sum over a constant length
        expected = sum(sums) / (N * L_max)
    elif loss_type == "dapo":  # every token of the step alike
        expected = sum(sums) / counted.sum().item()
    else:  # bnpo: token-level within each group, then the mean over the groups
        expected = (sum(sums[:3]) / counted[:3].sum().item() + sum(sums[3:]) / counted[3:].sum().item()) / 2
    assert ours == pytest.approx(expected, rel=1e-6)


def rows_of(prompt_ids, completions, advantages, weights, logps=None) -> list[dict]:
    return [dict(prompt_ids=prompt_ids[i // 2], ids=c, sampler_logps=torch.zeros(len(c)) if logps is None else
                 logps[i], advantage=a, weight=w, counted=True)
            for i, (c, a, w) in enumerate(zip(completions, advantages, weights))]


def test_one_iteration_gradient_is_reinforce_with_a_group_baseline_in_float64(tiny):
    """At mu = 1 the ratio is 1 and its gradient is the log-prob's: the loss's gradient must equal
    -sum_i w_i (r_i - mean of its group) sum_t grad log pi(o_it), REINFORCE with the group mean as baseline, written
    here from the model's own log-softmax in float64."""
    torch.manual_seed(1)
    model = load_model(tiny / "base", dtype=torch.float64)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="64-true")
    rewards_ = torch.tensor([1.0, 0.0, 0.3, 0.9], dtype=torch.float64)
    advantages, _, _ = grpo.group_advantages(rewards_, 2, "none")
    completions = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    weights = grpo.normalisation_weights("grpo", torch.tensor([len(c) for c in completions], dtype=torch.float64),
                                         2, 8)
    batch = grpo.collate_rollout(rows_of([[1, 2, 3], [4, 5]], completions, advantages.tolist(), weights.tolist()), 0)
    batch.update(weights=weights, advantages=advantages)  # float64 throughout
    objective, _ = grpo.policy_loss(fabric, model, batch, grpo.LossArgs(type="grpo"), 1.0, first_iteration=True)
    objective.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch["input_ids"])
    logp = torch.log_softmax(logits, -1)
    reinforce = 0
    for i, c in enumerate(completions):
        P = len([[1, 2, 3], [4, 5]][i // 2])
        reinforce = reinforce - weights[i].item() * advantages[i] * sum(logp[i, P - 1 + j, t] for j, t in enumerate(c))
    reinforce.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_clip_fractions_on_a_hand_made_batch(tiny):
    """Old log-probs set so that each token's ratio is known: a token is low-clipped when its ratio is under 1 - eps
    with a negative advantage, high-clipped when over 1 + eps_high with a positive one (TRL's definitions)."""
    model = load_model(tiny / "base")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    completions = [[5, 6], [7, 8], [9, 10], [11, 12]]
    batch = grpo.collate_rollout(rows_of([[1, 2], [3, 4]], completions, [1.0, -1.0, 1.0, -1.0], [0.125] * 4), 0)
    with torch.no_grad():
        current = grpo.token_logps(fabric, model, batch, 1.0)
    # ratios per completion (both tokens): 1.5 (A>0: high), 0.5 (A<0: low), 0.5 (A>0: neither), 1.5 (A<0: neither)
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5])[:, None]
    batch["old_logps"] = torch.where(batch["loss_mask"], current - ratios.log(), 0.0)
    _, stats = grpo.policy_loss(fabric, model, batch, grpo.LossArgs(epsilon=0.2, epsilon_high=0.28), 1.0,
                                first_iteration=False)
    s = dict(zip(grpo.SUMS, stats.tolist()))
    assert s["tokens"] == 8 and s["high_clipped"] == 2 and s["low_clipped"] == 2 and s["region_clipped"] == 4
    # and the clipped tokens carry no gradient: only completions 2 and 3 (ratio 0.5 with A > 0, 1.5 with A < 0) move
    objective, _ = grpo.policy_loss(fabric, model, {**batch, "advantages": torch.tensor([1.0, -1.0, 0.0, 0.0])},
                                    grpo.LossArgs(epsilon=0.2, epsilon_high=0.28), 1.0, first_iteration=False)
    assert not objective.requires_grad or all(p.grad is None for p in model.parameters())


def test_sampler_log_probs_are_the_trainers_and_the_stop_token_stays(tiny):
    """The KV-cache sampler's log-prob of each token equals the training forward pass's (float32), and a completion
    keeps the stop token that ended it."""
    model = load_model(tiny / "base")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(3)
    args = grpo.RolloutArgs(num_generations=2, max_new_tokens=12, temperature=0.7)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    stops = list(range(10, 50))  # an eighth of the vocabulary: most rows stop within 12 tokens
    samples = grpo.sample_completions(fabric, model, prompts * 2, args, stop_ids=stops, pad_id=0)
    assert any(not s["truncated"] and s["ids"][-1] in stops for s in samples)
    assert all(t not in stops for s in samples for t in s["ids"][:-1])
    assert all(len(s["ids"]) == 12 for s in samples if s["truncated"])
    rows = [dict(prompt_ids=p, ids=s["ids"], sampler_logps=s["logps"], advantage=0.0, weight=0.0, counted=True)
            for p, s in zip(prompts * 2, samples)]
    batch = grpo.collate_rollout(rows, 0)
    with torch.no_grad():
        trainer = grpo.token_logps(fabric, model, batch, 0.7)
    torch.testing.assert_close(batch["sampler_logps"], trainer, atol=1e-5, rtol=0)



def test_a_group_prefilled_once_samples_what_its_rows_sample_alone(tiny):
    """generate_tokens(group_size=G): each run of G identical prompts prefilled once, its KV cache copied to the
    run's rows; with the same generators the completions and log-probs are those of prefilling every row."""
    model = load_model(tiny / "base")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    args = grpo.RolloutArgs(num_generations=3, max_new_tokens=10)
    prompts = [[1, 2, 3, 4]] * 3 + [[5, 6]] * 3  # of two lengths: the shorter run is left-padded

    def sampled(group_size: int) -> list[dict]:
        generators = [g for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)) for _ in "abc"]
        return grpo.sample_completions(fabric, model, prompts, args, stop_ids=list(range(10, 50)), pad_id=0,
                                       generators=generators, group_size=group_size)

    alone, shared = sampled(1), sampled(3)
    assert [s["ids"] for s in shared] == [s["ids"] for s in alone]
    assert len({tuple(s["ids"]) for s in shared[:3]}) > 1  # a group's rows still differ
    for a, b in zip(alone, shared):
        torch.testing.assert_close(a["logps"], b["logps"], atol=1e-5, rtol=0)


def test_token_log_probs_and_entropy_at_a_temperature_equal_the_full_softmax(tiny):
    """model(..., per_token=True, temperature=T, entropy=True), chunked, against log_softmax(logits / T) of the whole
    logits: the label's log-prob (with its gradient) and the entropy of each scored position (0 elsewhere)."""
    model = load_model(tiny / "base", dtype=torch.float64)
    x = torch.randint(0, VOCAB, (2, 9))
    y = torch.randint(0, VOCAB, (2, 9)).masked_fill(torch.rand(2, 9) < 0.3, IGNORE_INDEX)
    logps, entropy = model(x, targets=y, per_token=True, temperature=0.6, entropy=True)
    full = torch.log_softmax(model(x) / 0.6, dim=-1)
    kept = y != IGNORE_INDEX
    expected = full.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * kept
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1) * kept)
    assert logps.requires_grad and not entropy.requires_grad


def test_rewards_shipped():
    completions = ["So 3 + 4 is 7", [{"role": "assistant", "content": "It is -1,200.\n-1,200"}], "no number", "7.0"]
    assert rewards.final_number(None, completions, None, answer=["7", "-1200", "3", 7]) == [1.0, 1.0, 0.0, 1.0]
    assert rewards.final_number(None, ["7"], None, answer=[None]) == [None]
    assert rewards.strict_format(None, ["Adding them.\n42", "42", "The answer is 42.", "42\nthen more"], None) == \
        [1.0, 1.0, 0.0, 0.0]
    # DAPO's soft overlong punishment: 0 to L - L/5, then linear to -1 at L
    assert rewards.length_penalty(None, None, [[0] * 80, [0] * 90, [0] * 100, [0] * 120],
                                  max_completion_length=100) == [0.0, -0.5, -1.0, -1.0]


# ---- whole runs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,extra", [
    ("32-true", []), ("bf16-true", []),
    ("bf16-true", ["--lora.r", "8", "--lora.targets", "[q,v,lm_head]", "--train.lr", "3e-2", "--train.min_lr", "3e-2"])],
    ids=["full-fp32", "full-bf16", "lora-bf16"])
def test_a_tiny_model_learns_the_toy_reward(tiny, tmp_path, precision, extra):
    """From near chance (a tenth of the vocabulary: reward ~0.1) to well above it within 24 steps."""
    rows = run(tiny, tmp_path / "out", "--precision", precision, "--train.max_steps", "24", "--eval.interval", "24",
               "--checkpoint.interval", "24", "--rollout.max_new_tokens", "8", *extra)
    first, last = [sum(float(r["reward"]) for r in part) / 4 for part in (rows[:4], rows[-4:])]
    assert first < 0.15 and last > 0.6, (first, last)
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        before = next(csv.DictReader(f))  # step 0
    assert before["step"] == "0" and float(before["val_reward"]) + 0.3 < float(rows[-1]["val_reward"])
    if "--lora.r" in extra:  # an adapter directory, float32 adapter weights whatever the precision
        model, _ = load_lora_model(tmp_path / "out" / "final")
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    else:
        trained = load_model(tmp_path / "out" / "final").embed.weight.dtype  # bf16-true trains (and saves) bf16
        assert trained == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


def test_a_qlora_policy_samples_from_its_quantised_self_and_trains_its_adapter(tiny, tmp_path, capsys):
    """--quantize bnb.nf4 with an adapter: no decode copy (a float copy of a 4-bit base would cost 4-8x its memory),
    so the rollout samples from the quantised policy itself and its log-probs are the trainer's; the adapter learns."""
    out = tmp_path / "out"
    rows = run(tiny, out, "--quantize", "bnb.nf4", "--lora.r", "8", "--lora.targets", "[q,v,lm_head]",
               "--train.max_steps", "2", "--checkpoint.interval", "2")
    assert "bnb.nf4" in capsys.readouterr().out
    assert all(float(r["sampling/sampling_logp_difference/mean"]) < 1e-4 for r in rows)
    model, _ = load_lora_model(out / "final", quantize="bnb.nf4")
    assert type(model.layers[0].attn.q_proj.base).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 and p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_the_loss_does_not_depend_on_the_micro_batch_split(tiny, tmp_path):
    for loss_type in ("grpo", "bnpo"):
        one = run(tiny, tmp_path / f"{loss_type}1", "--loss.type", loss_type, "--train.micro_batch_size", "1",
                  "--train.max_steps", "2")
        all_ = run(tiny, tmp_path / f"{loss_type}8", "--loss.type", loss_type, "--train.micro_batch_size", "8",
                   "--train.max_steps", "2")
        for a, b in zip(one, all_):
            assert a["reward"] == b["reward"]  # the same rollouts
            for key in ("loss", "entropy", "clip_ratio/region_mean"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-7), key


def test_a_killed_run_resumes_to_the_same_rewards_and_losses(tiny, tmp_path):
    extra = ["--train.max_steps", "4", "--loss.num_iterations", "2", "--rollout.max_new_tokens", "8"]
    whole = run(tiny, tmp_path / "whole", *extra)
    part = run(tiny, tmp_path / "part", *extra, "--train.max_time", "1e-9")  # stops after step 1, as a kill would
    assert len(part) == 1
    resumed = run(tiny, tmp_path / "part", *extra, "--resume", "auto")
    for key in ("reward", "loss", "clip_ratio/region_mean", "completions/mean_length", "val_reward"):
        assert [r[key] for r in resumed] == [r[key] for r in whole], key
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "completions.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4]  # the log reads as one run too
    # mu = 2: the second update of each rollout moves the ratio off 1, and some tokens leave the clip range
    assert any(float(r["clip_ratio/region_mean"]) > 0 for r in whole)


def test_sigusr1_checkpoints_requeues_and_resumes(tiny, tmp_path, monkeypatch, capsys, slurm_job):
    whole = run(tiny, tmp_path / "whole")

    def lr_at_and_signal(step, *args):  # lr_at is called at the start of every step
        if step == 2:
            signal.raise_signal(signal.SIGUSR1)
        return grpo_lr_at(step, *args)

    grpo_lr_at = grpo.lr_at
    with monkeypatch.context() as patch:
        patch.setattr(grpo, "lr_at", lr_at_and_signal)
        stopped = run(tiny, tmp_path / "run")
    assert int(stopped[-1]["step"]) == 2 and "SIGUSR1: stopped after step 2" in capsys.readouterr().out
    assert not (tmp_path / "run" / "final").exists()
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    resumed = run(tiny, tmp_path / "run", "--resume", "auto")
    assert [r["reward"] for r in resumed] == [r["reward"] for r in whole]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("extra", [[], ["--lora.r", "4", "--lora.targets", "[q,v,lm_head]", "--reference", "base"]],
                         ids=["copy", "lora-base"])
def test_the_kl_to_the_reference_starts_at_zero_and_grows(tiny, tmp_path, extra):
    """k3 to a frozen copy, or to the base under the adapter: 0 while the policy is the reference, then above."""
    rows = run(tiny, tmp_path / "out", "--loss.beta", "0.1", "--train.max_steps", "3", *extra)
    kl = [float(r["kl"]) for r in rows]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-5, kl  # policy = reference, then apart


def test_a_chat_prompt_gets_chat_completions_and_its_fields(tiny, tmp_path):
    """Reward functions see what TRL's see: the record's prompt, the completion in chat form for a chat prompt, and
    the other fields; a fast_dev_run writes final/ and completions.jsonl with the rewards."""
    (tmp_path / "spy.py").write_text(
        "import json\n"
        "def spy(prompts, completions, completion_ids, answer, **fields):\n"
        f"    open({str(tmp_path / 'seen.jsonl')!r}, 'a').write(json.dumps([prompts, completions, answer]) + '\\n')\n"
        "    return [None if a == '0' else 1.0 for a in answer]\n")
    rows = run(tiny, tmp_path / "out", "--rewards", f"[{tmp_path / 'spy.py'}:spy]", "--fast_dev_run", "true")
    prompts, completions, answers = json.loads((tmp_path / "seen.jsonl").read_text().splitlines()[0])
    for prompt, completion in zip(prompts, completions):
        assert isinstance(completion, list) == isinstance(prompt, list)
        if isinstance(completion, list):
            assert completion[0]["role"] == "assistant"
    assert all(a.isdigit() for a in answers) and len(rows) == 2
    logged = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "rewards", "advantage"} <= set(logged[0]) and "spy" in logged[0]["rewards"]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--rewards", "[toy_missing_module:share]"], "--rewards: 'toy_missing_module:share': importing"),
    (["--rewards", "[rewards]"], "expected module:function"),
    (["--rewards", "[rewards:nothing_here]"], "rewards has no function nothing_here"),
    (["--loss.type", "ppo"], "--loss.type"),
    (["--strategy", "fsdp"], "--strategy"),
    (["--rollout.num_generations", "1"], "at least 2"),
    (["--reward_weights", "[1.0, 2.0]"], "one weight per reward function"),
    (["--rollout.max_new_tokens", "64"], "must fit the model's block_size"),
])
def test_bad_flags_are_one_line_and_write_nothing(tiny, tmp_path, flags, message):
    with pytest.raises((InputError, ValueError)) as error:
        run(tiny, tmp_path / "out", *flags)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out" / "metrics.csv").exists()


@pytest.mark.parametrize("function,message", [("broken", "reward function broken raised KeyError: 'answer'"),
                                              ("too_few", "reward function too_few returned")])
def test_a_failing_reward_function_is_named(tiny, tmp_path, function, message):
    with pytest.raises(InputError, match=message):
        run(tiny, tmp_path / "out", "--rewards", f"[{tiny / 'toy.py'}:{function}]")


def test_a_malformed_prompt_record_is_named_by_file_and_line(tiny, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "1"}, {"question": "no prompt"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a record with a 'prompt' field"):
        run(tiny, tmp_path / "out", "--data.train_files", str(tmp_path / "bad.jsonl"))


@pytest.mark.slow  # Fabric starts two processes (gloo): ~1 min
@pytest.mark.parametrize("extra", [[], ["--lora.r", "4", "--lora.targets", "[q,v,lm_head]", "--loss.beta", "0.1"]],
                         ids=["full", "lora-kl"])
def test_two_processes_match_one(tiny, tmp_path, extra):
    """2 ranks sampling 1 prompt's group each against 1 rank sampling both: each group draws from its own generator
    (seeded by the step and the prompt's place), so the rollouts are the same, and the numbers agree only if the
    advantages, normalisation and metrics are the whole step's on every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, devices in (("one", "1"), ("two", "2")):
        result = subprocess.run([sys.executable, "grpo.py", *args_of(tiny, tmp_path / out, *extra, "--devices",
                                                                     devices, "--strategy", "ddp")],
                                capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (list(csv.DictReader(open(tmp_path / d / "metrics.csv", newline=""))) for d in ("one", "two"))
    assert len(one) == len(two) == 4 and [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for key in ("reward", "reward_std", "loss", "entropy", "completions/mean_length", "val_reward", "kl"):
        assert [float(r[key] or 0) for r in two] == pytest.approx([float(r[key] or 0) for r in one], abs=1e-5), key


@pytest.mark.parametrize("config", sorted((ROOT / "config_hub").glob("grpo_*.yaml")), ids=lambda p: p.name)
def test_config_hub_recipes_parse(config, capsys):
    with pytest.raises(SystemExit):
        CLI(grpo.setup, args=["--config", str(config), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["num_generations"] >= 2
