"""align.py and pref_data.py: every loss against a float64 reference written from its paper, the step-0 values (policy
= reference), the three ways to get the reference's log-probs agreeing, the loss independent of the micro-batch split,
exact resume with a precomputed reference, learning in float32 and bfloat16, and bad data as one line."""

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

import align
from checkpoint import load_lora_model, load_model, save_checkpoint, save_lora
from conftest import ROOT
from data_prep import train_tokenizer
from model import GPT, Config, InputError, LoRAConfig, add_lora, lora_disabled, lora_state_dict
from pref_data import collate_preferences, load_preference_data
from test_finetune import write_jsonl
from tokenizer import Tokenizer

VOCAB, BLOCK = 320, 64
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar",
         "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Xena", "Yuri"]
COLOURS = ["red", "blue", "green", "yellow"]


def pair_records() -> list[dict]:
    """A preference that generalises to held-out names: every hat is red, never blue. Half the prompts as chat
    messages, half as strings; rejected as an assistant message."""
    records = []
    for i, name in enumerate(NAMES):
        question = f"What colour is {name}'s hat?"
        records.append({"prompt": [{"role": "user", "content": question}] if i % 2 else question,
                        "chosen": f"{name}'s hat is red.",
                        "rejected": {"role": "assistant", "content": f"{name}'s hat is blue."}})
    return records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("align")
    write_jsonl(root / "pairs.jsonl", pair_records())
    write_jsonl(root / "kto.jsonl", [{"prompt": r["prompt"], "completion": r[key] if key == "chosen" else
                                      r[key]["content"], "label": key == "chosen"}
                                     for r in pair_records() for key in ("chosen", "rejected")])
    (root / "corpus").mkdir()
    text = "\n".join(f"What colour is {n}'s hat? {n}'s hat is {c}." for n in NAMES for c in COLOURS)
    (root / "corpus" / "chat.txt").write_text(3 * (text + "\nuser assistant\n"))
    train_tokenizer.main(inputs=str(root / "corpus"), out_dir=root / "base", vocab_size=VOCAB)
    config_file = root / "base" / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK)
    save_checkpoint(root / "base", config, GPT(config).state_dict(), tokenizer_dir=root / "base")
    return root


def args_of(tiny: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint_dir", str(tiny / "base"), "--data.train_files", str(tiny / "pairs.jsonl"),
            "--data.val_split", "0.2", "--out_dir", str(out_dir), "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.epochs", "null", "--train.max_steps", "4", "--train.lr", "1e-3",
            "--train.warmup_steps", "0", "--train.min_lr", "1e-3", "--eval.interval", "2", "--eval.max_new_tokens",
            "4", "--eval.prompt", "What colour is Alice's hat?", "--checkpoint.interval", "2", *extra]


def run(tiny: Path, out_dir: Path, *extra: str) -> list[dict]:
    """align.py's command line in this process, one thread (tiny models), and the metrics it wrote."""
    sigusr1, threads = signal.getsignal(signal.SIGUSR1), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        CLI(align.setup, args=args_of(tiny, out_dir, *extra), exit_on_error=False)
    finally:  # the run's SIGUSR1 handler (training.StopSignal) goes with it
        signal.signal(signal.SIGUSR1, sigusr1)
        torch.set_num_threads(threads)
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- the losses, against float64 references from the papers -------------------------------------------------------

def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class Args:
    beta, label_smoothing, gamma_beta_ratio, desirable_weight, undesirable_weight = 0.3, 0.1, 0.5, 1.5, 0.7


def paper_loss(name: str, w: float, l: float, rw: float, rl: float) -> float:
    """One pair, in float64 Python arithmetic, written from each paper's formula (logps are sums, or means for the
    token-averaged losses; the caller passes the right ones)."""
    b, eps = Args.beta, Args.label_smoothing
    h = (w - rw) - (l - rl)  # DPO's implicit reward margin over beta
    if name == "sigmoid":  # DPO eq. 7; cDPO: the expectation over a label flipped with probability eps
        return -(1 - eps) * logsig(b * h) - eps * logsig(-b * h)
    if name == "ipo":  # IPO eq. 17: (h - 1/(2 tau))^2
        return (h - 1 / (2 * b)) ** 2
    if name == "hinge":
        return max(0.0, 1 - b * h)
    if name == "robust":  # rDPO eq. 9
        return ((1 - eps) * -logsig(b * h) + eps * logsig(-b * h)) / (1 - 2 * eps)
    if name == "apo_zero":
        return (1 - sig(b * (w - rw))) + sig(b * (l - rl))
    if name == "simpo":  # SimPO eq. 6 on average log-likelihoods: -log sigma(beta avg_w - beta avg_l - gamma)
        return -logsig(b * w - b * l - Args.gamma_beta_ratio * b)
    if name == "orpo":  # ORPO eq. 6-7: NLL + lambda * -log sigma(log(odds_w / odds_l))
        odds = lambda logp: math.exp(logp) / (1 - math.exp(logp))  # noqa: E731
        return -w - b * logsig(math.log(odds(w) / odds(l)))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "simpo", "orpo"])
def test_each_loss_equals_its_paper_in_float64(name):
    torch.manual_seed(0)
    # average log-probs must be < 0 for ORPO's odds; sums anywhere below 0
    w, l, rw, rl = (-torch.rand(64, dtype=torch.float64) * 3 - 0.01 for _ in range(4))
    fn = align.LOSSES[name][0]
    ours = fn(w, l, rw, rl, Args)
    expected = torch.tensor([paper_loss(name, *map(float, v)) for v in zip(w, l, rw, rl)], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_kto_loss_equals_its_paper_in_float64():
    torch.manual_seed(0)
    logratios, kl = torch.randn(32, dtype=torch.float64), 0.2
    desirable = torch.rand(32) > 0.5
    ours = align.kto_loss(logratios, desirable, torch.tensor(kl, dtype=torch.float64), Args)
    # KTO eq. 8: w(y) (1 - v(x, y)), v = sigmoid(beta (r - z0)) if desirable else sigmoid(beta (z0 - r))
    expected = [Args.desirable_weight * (1 - sig(Args.beta * (r - kl))) if d else
                Args.undesirable_weight * (1 - sig(Args.beta * (kl - r)))
                for r, d in zip(logratios.tolist(), desirable)]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---- data ----------------------------------------------------------------------------------------------------------

def test_pairs_share_their_prompt_tokens_and_score_only_the_completion(tiny):
    tokenizer = Tokenizer(tiny / "base")
    train, _, stats = load_preference_data(tiny / "pairs.jsonl", tokenizer, max_seq_length=BLOCK)
    assert stats["train"] == 20 and train.paired
    prompt, chosen, rejected = train[0]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is Alice's hat?"}],
                                             add_generation_prompt=True)
    assert tokenizer.decode(prompt.tolist()) == rendered
    assert tokenizer.decode(chosen.tolist()) == "Alice's hat is red.<|eos|>\n"  # the end-of-turn token included
    batch = collate_preferences([train[0], train[1]], train.pad_id, BLOCK)
    assert batch["input_ids"].shape[0] == 4  # the 2 chosen rows, then the 2 rejected
    targets = batch["labels"][0][batch["labels"][0] != -100]
    assert targets.tolist() == chosen.tolist()
    assert torch.equal(batch["input_ids"][2, :len(prompt)], prompt.long())


def test_a_long_pair_keeps_its_prompt_start_and_a_prompt_without_room_is_dropped(tiny, tmp_path):
    tokenizer = Tokenizer(tiny / "base")
    records = pair_records()[:3]
    records[1]["chosen"] = "red " * 40
    records[2]["prompt"] = "What colour " * 40
    train, _, stats = load_preference_data(write_jsonl(tmp_path / "p.jsonl", records), tokenizer, max_seq_length=48)
    assert stats["truncated"] == 1 and stats["dropped"] == 1 and len(train) == 2
    assert all(len(p) + len(c) <= 49 for p, c, r in train.examples for c in (c, r))


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "p.jsonl:2: expected field 'rejected' (a string, or assistant messages)"),
    ({"prompt": "Hi", "completion": "Hello", "label": "yes"}, "p.jsonl:2: expected field 'label' (true or false)"),
    ({"question": "Hi"}, "p.jsonl:2: expected a record with 'prompt'"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "chosen": "a",
      "rejected": "b"}, "p.jsonl:2: the prompt ends with an assistant message"),
])
def test_a_malformed_record_is_named_by_file_and_line(tiny, tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [pair_records()[0], record])
    with pytest.raises(InputError) as e:
        load_preference_data(path, Tokenizer(tiny / "base"), max_seq_length=BLOCK)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_implicit_prompt_is_the_conversations_shared_start(tiny, tmp_path):
    """TRL's implicit-prompt form (UltraFeedback-binarized): whole conversations, the prompt being what they share."""
    explicit = pair_records()[1]  # its prompt is a message list
    implicit = {"chosen": explicit["prompt"] + [{"role": "assistant", "content": explicit["chosen"]}],
                "rejected": explicit["prompt"] + [explicit["rejected"]]}
    tokenizer = Tokenizer(tiny / "base")
    a = load_preference_data(write_jsonl(tmp_path / "a.jsonl", [explicit]), tokenizer, max_seq_length=BLOCK)[0]
    b = load_preference_data(write_jsonl(tmp_path / "b.jsonl", [implicit]), tokenizer, max_seq_length=BLOCK)[0]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_identical_chosen_and_rejected_are_dropped_and_counted(tiny, tmp_path):
    records = pair_records()[:4]
    records[0]["rejected"] = records[0]["chosen"]
    train, _, stats = load_preference_data(write_jsonl(tmp_path / "p.jsonl", records), Tokenizer(tiny / "base"),
                                           max_seq_length=BLOCK)
    assert stats["identical"] == 1 and len(train) == 3
    with pytest.raises(InputError, match="no training examples left"):
        load_preference_data(write_jsonl(tmp_path / "q.jsonl", records[:1]), Tokenizer(tiny / "base"),
                             max_seq_length=BLOCK)


@pytest.mark.parametrize("flags,message", [
    (["--loss.type", "dpo"], "--loss.type 'dpo': expected one of sigmoid, ipo"),
    (["--loss.beta", "0"], "--loss.beta 0.0: expected a positive number"),
    (["--reference", "base"], "--reference base: expected --lora too"),
    (["--loss.type", "kto"], "--loss.type kto: needs unpaired records"),
    (["--data.train_files", "{kto}"], "--loss.type sigmoid: needs paired records"),
    (["--data.max_seq_length", "65"], "--data.max_seq_length 65 exceeds the model's block_size 64"),
    (["--reference_quantize", "nf4"], "--reference_quantize 'nf4': expected one of bnb.nf4"),
    (["--reference_quantize", "bnb.nf4", "--lora.r", "4"], "--reference_quantize quantises a frozen copy; this "
                                                           "run's reference is base"),
    (["--reference_quantize", "bnb.nf4", "--loss.type", "simpo"], "this run's reference is none (simpo)"),
    (["--strategy", "fsdp", "--reference_quantize", "bnb.nf4"], "--strategy fsdp: expected no --quantize or "
                                                                "--reference_quantize"),
])
def test_bad_flags_are_one_line_and_write_nothing(tiny, tmp_path, flags, message):
    flags = [f.format(kto=tiny / "kto.jsonl") for f in flags]
    with pytest.raises(InputError) as e:
        CLI(align.setup, args=args_of(tiny, tmp_path / "out", *flags), exit_on_error=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "final").exists()


# ---- the model's side ----------------------------------------------------------------------------------------------

def test_sequence_logps_equal_log_softmax_gathered_in_float64(tiny):
    model = load_model(tiny / "base", dtype=torch.float64)
    train, _, _ = load_preference_data(tiny / "pairs.jsonl", Tokenizer(tiny / "base"), max_seq_length=BLOCK)
    batch = collate_preferences(train.examples[:3], train.pad_id, BLOCK)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="64-true")
    sums, counts = align.sequence_logps(fabric, model, batch)
    logp = torch.log_softmax(model(batch["input_ids"]), dim=-1)
    mask = batch["labels"] != -100
    gathered = logp.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(sums, gathered.sum(-1), rtol=1e-12, atol=1e-12)
    assert counts.tolist() == mask.sum(-1).tolist()


@pytest.mark.parametrize("data,loss_type", [("pairs.jsonl", "sigmoid"), ("kto.jsonl", "kto")])
def test_the_three_references_give_the_same_loss(tiny, tmp_path, data, loss_type):
    """A LoRA policy whose adapter is not zero: its base with the adapter off, a copy of the base checkpoint and the
    precomputed table all give the reference the same log-probs, so the loss is the same. For KTO that includes the
    KL rows: each example's partner is fixed by the data set, not by the batch it falls in."""
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    torch.manual_seed(1)
    policy = load_model(tiny / "base")
    add_lora(policy, LoRAConfig(r=4, targets=("q", "v")))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    copy = load_model(tiny / "base").eval()
    train, val, _ = load_preference_data(tiny / data, Tokenizer(tiny / "base"), max_seq_length=BLOCK)
    ids = [3, 7]
    batch = train.collate(ids, BLOCK)
    off = align.reference_logps_of_base(fabric, policy, batch)[0]
    with torch.no_grad():
        copied = align.sequence_logps(fabric, copy, batch)[0]
    table = align.load_or_compute_reference(fabric, tmp_path / "ref.safetensors",
                                            lambda b: align.reference_logps_of_base(fabric, policy, b),
                                            {"train": train, "val": val}, 2, BLOCK, "base", tiny / "base", None)
    precomputed = torch.cat([table["train"][ids, 0], table["train"][ids, 1]])
    torch.testing.assert_close(off, copied, rtol=0, atol=1e-5)
    torch.testing.assert_close(precomputed, off, rtol=0, atol=1e-5)
    with lora_disabled(policy):  # the switch is the adapter's alone: outside it the policy differs from the base
        assert torch.equal(align.sequence_logps(fabric, policy, batch)[0].detach(), off)
    assert not torch.allclose(align.sequence_logps(fabric, policy, batch)[0].detach(), off)
    losses = [align.preference_loss(fabric, policy, batch, ref, align.LossArgs(type=loss_type))[0]
              for ref in (off, copied, precomputed)]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], rtol=0, atol=1e-5)


def test_a_quantised_reference_copy_is_packed_and_scores_near_the_float_one(tiny, tmp_path):
    """--reference_quantize: the frozen copy's projections are bitsandbytes layers, and its log-probs differ from the
    float copy's by the quantisation error only, so step 0 is close to DPO's ln 2 but not exactly at it."""
    from bitsandbytes.nn import Linear4bit
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    packed = align.load_frozen(tiny / "base", fabric.device, torch.float32, "bnb.nf4", torch.float32)
    assert isinstance(packed.layers[0].attn.q_proj, Linear4bit) and not packed.training
    train, _, _ = load_preference_data(tiny / "pairs.jsonl", Tokenizer(tiny / "base"), max_seq_length=BLOCK)
    batch = collate_preferences(train.examples[:4], train.pad_id, BLOCK)
    float_logps = align.reference_logps_of_copy(fabric, align.load_frozen(tiny / "base", "cpu", torch.float32), batch)
    nf4_logps = align.reference_logps_of_copy(fabric, packed, batch)
    assert 0 < (nf4_logps[0] - float_logps[0]).abs().max() < 0.05 * float_logps[0].abs().max()
    rows = run(tiny, tmp_path / "out", "--train.max_steps", "1", "--reference_quantize", "bnb.nf4")
    assert float(rows[0]["train_loss"]) == pytest.approx(math.log(2), abs=0.05)
    assert float(rows[0]["train_loss"]) != pytest.approx(math.log(2), abs=1e-6)


# ---- runs ------------------------------------------------------------------------------------------------------------

def sft_adapter(tiny: Path, out_dir: Path, base: Path) -> Path:
    """An adapter on the tiny base, its B not zero (as after SFT), saved naming `base` as its base."""
    torch.manual_seed(2)
    model = load_model(tiny / "base")
    add_lora(model, LoRAConfig(r=4, targets=("q", "v", "up")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_lora(out_dir, LoRAConfig(r=4, targets=("q", "v", "up")), lora_state_dict(model), base, tiny / "base")


def test_an_sft_adapter_trains_on_against_itself_as_the_reference(tiny, tmp_path):
    """--checkpoint_dir an adapter directory: the policy is its base with it on top, the reference a frozen copy of
    the same (not the base alone), so step 0 is DPO's ln 2; the result is an adapter naming the same base."""
    adapter = sft_adapter(tiny, tmp_path / "sft", tiny / "base")
    rows = run(tiny, tmp_path / "out", "--checkpoint_dir", str(adapter), "--train.max_steps", "2")
    assert float(rows[0]["train_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    model, base = load_lora_model(tmp_path / "out" / "final")
    assert base == tiny / "base" and model.layers[0].mlp.up_proj.lora_A.shape == (4, 64)
    with pytest.raises(InputError, match="--reference base: .* is an adapter"):
        CLI(align.setup, args=args_of(tiny, tmp_path / "o2", "--checkpoint_dir", str(adapter), "--reference", "base"),
            exit_on_error=False)


def test_an_adapter_whose_base_does_not_fit_is_one_line(tiny, tmp_path):
    wide = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK, intermediate_size=256)
    save_checkpoint(tmp_path / "wide", wide, GPT(wide).state_dict(), tokenizer_dir=tiny / "base")
    adapter = sft_adapter(tiny, tmp_path / "sft", tmp_path / "wide")
    with pytest.raises(InputError) as e:
        CLI(align.setup, args=args_of(tiny, tmp_path / "out", "--checkpoint_dir", str(adapter)), exit_on_error=False)
    assert str(e.value).startswith(f"{adapter / 'lora.safetensors'}: layers.0.mlp.up_proj.lora_B has shape (128, 4)")
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("extra", [[], ["--lora.r", "4"], ["--precompute_reference", "true"]],
                         ids=["full-copy", "lora-base", "full-precomputed"])
def test_step_zero_dpo_is_ln2_with_zero_rewards_and_no_wins(tiny, tmp_path, extra):
    rows = run(tiny, tmp_path / "out", "--train.max_steps", "1", *extra)
    first = rows[0]
    assert float(first["train_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(first[key]) == pytest.approx(0, abs=1e-6)
    if "--precompute_reference" not in extra:  # the same forward pass twice: exact ties, and a tie is not a win
        assert float(first["rewards/accuracies"]) == 0
    # (precomputed, the reference scored each pair in another batch, padded to another length: the log-probs agree
    # to ~1e-7, not to the bit, so a tie can fall either way)
    assert float(first["logps/chosen"]) < 0 and float(first["logps/rejected"]) < 0


def test_the_loss_does_not_depend_on_the_micro_batch_split(tiny, tmp_path):
    """Step 2's numbers also show that step 1's update was the same (weights differ by summation order only)."""
    one = run(tiny, tmp_path / "one", "--train.max_steps", "2", "--train.micro_batch_size", "1")
    two = run(tiny, tmp_path / "two", "--train.max_steps", "2", "--train.micro_batch_size", "4")
    for a, b in zip(one, two):
        for key in ("train_loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key


def test_a_killed_run_with_a_precomputed_reference_resumes_to_the_same_numbers(tiny, tmp_path):
    whole = run(tiny, tmp_path / "whole", "--precompute_reference", "true")
    part = run(tiny, tmp_path / "part", "--precompute_reference", "true", "--train.max_steps", "4",
               "--train.max_time", "1e-9")  # stops after step 1 with a checkpoint, as a kill would leave it
    assert len(part) == 1
    table = tmp_path / "part" / "reference_logps.safetensors"
    written = table.stat().st_mtime_ns
    resumed = run(tiny, tmp_path / "part", "--precompute_reference", "true", "--resume", "auto")
    assert table.stat().st_mtime_ns == written  # read back, not computed again
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in whole]


def test_sigusr1_checkpoints_requeues_and_resumes(tiny, tmp_path, monkeypatch, capsys, slurm_job):
    """SLURM's warning before the time limit, raised during step 2 (as tests/test_distill.py's): a checkpoint after
    that step, `scontrol requeue`, no final/; --resume auto then finishes with the uninterrupted run's numbers."""
    whole = run(tiny, tmp_path / "whole", "--lora.r", "4")

    def lr_at_and_signal(step, *args):  # lr_at is called at the start of every step
        if step == 2:
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None), "no SIGUSR1 handler"
            signal.raise_signal(signal.SIGUSR1)
        return align_lr_at(step, *args)

    align_lr_at = align.lr_at
    with monkeypatch.context() as patch:
        patch.setattr(align, "lr_at", lr_at_and_signal)
        stopped = run(tiny, tmp_path / "run", "--lora.r", "4")
    assert int(stopped[-1]["step"]) == 2 and "SIGUSR1: stopped after step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "step-00000002" / "state" / "train_state.pt").is_file()
    assert not (tmp_path / "run" / "final").exists()
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    resumed = run(tiny, tmp_path / "run", "--lora.r", "4", "--resume", "auto")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    assert (tmp_path / "run" / "final" / "lora.safetensors").is_file()


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("loss,extra", [("sigmoid", []), ("simpo", ["--loss.beta", "2.0"]),
                                        ("sigmoid", ["--lora.r", "8", "--train.lr", "1e-2", "--train.min_lr", "1e-2"])],
                         ids=["dpo-full", "simpo-full", "dpo-lora"])
def test_the_policy_learns_to_prefer_the_chosen(tiny, tmp_path, precision, loss, extra):
    rows = run(tiny, tmp_path / "out", "--loss.type", loss, "--precision", precision, "--train.max_steps", "8",
               "--eval.interval", "8", "--checkpoint.interval", "8", *extra)
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < float(first["train_loss"]) - 0.05
    assert float(last["rewards/margins"]) > float(first["rewards/margins"])
    assert float(last["val_rewards/accuracies"]) >= 0.75  # held-out names: the preference generalises
    if "--lora.r" in extra:  # an adapter directory, float32 adapter weights whatever the precision
        model, _ = load_lora_model(tmp_path / "out" / "final")
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    else:
        assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.slow  # Fabric starts two processes (gloo): ~1 min
@pytest.mark.parametrize("strategy,extra", [
    ("ddp", []), ("ddp", ["--lora.r", "4", "--lora.dropout", "0"]), ("ddp", ["--precompute_reference", "true"]),
    ("fsdp", []), ("fsdp", ["--lora.r", "4", "--lora.dropout", "0", "--precompute_reference", "true"])],
    ids=["ddp-full-copy", "ddp-lora-base", "ddp-full-precomputed", "fsdp-full-copy", "fsdp-lora-base-precomputed"])
def test_two_processes_match_one(tiny, tmp_path, strategy, extra):
    """2 ranks with 1 micro-batch of 2 pairs each against 1 rank accumulating 2: the same pairs per step, so the
    numbers agree only if each pair weighs 1 / (pairs of the step) on every rank (and the precomputed table is
    filled by both ranks' shares). Under FSDP2 the policy and the reference copy are sharded over the ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, devices in (("one", "1"), ("two", "2")):
        result = subprocess.run([sys.executable, "align.py", *args_of(tiny, tmp_path / out, *extra, "--devices",
                                                                      devices, "--strategy", strategy)],
                                capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (list(csv.DictReader(open(tmp_path / d / "metrics.csv", newline=""))) for d in ("one", "two"))
    for key in ("train_loss", "rewards/margins", "rewards/accuracies", "val_loss", "val_rewards/margins"):
        assert [float(r[key] or 0) for r in two] == pytest.approx([float(r[key] or 0) for r in one], abs=1e-5), key
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]


def test_each_kto_example_has_a_fixed_partner_of_another_prompt(tiny):
    """kto.jsonl holds each prompt's two answers side by side: the next example is no mismatch, the partner is."""
    train, val, _ = load_preference_data(tiny / "kto.jsonl", Tokenizer(tiny / "base"), max_seq_length=BLOCK,
                                         val_split=0.2, seed=3)
    for dataset in (train, val):
        assert len(dataset.kl_partners) == len(dataset) > 0
        assert all(not torch.equal(dataset[i][0], dataset[j][0]) for i, j in enumerate(dataset.kl_partners))
    assert any(torch.equal(train[i][0], train[i + 1][0]) for i in range(len(train) - 1))  # the data's own order
    again, _, _ = load_preference_data(tiny / "kto.jsonl", Tokenizer(tiny / "base"), max_seq_length=BLOCK,
                                       val_split=0.2, seed=3)
    assert again.kl_partners == train.kl_partners
    batch = train.collate([0, 1], BLOCK)  # the KL rows: prompts 0 and 1 with their partners' completions
    partner = train[train.kl_partners[0]]
    assert torch.equal(batch["input_ids"][2, :len(train[0][0]) + len(partner[1]) - 1],
                       torch.cat([train[0][0], partner[1]])[:-1].long())


def test_kto_runs_on_unpaired_data_and_logs_its_kl(tiny, tmp_path):
    """The same run with the reference live and precomputed: its KL rows have fixed partners, so the table holds
    them and the two runs train to the same numbers."""
    kto = ["--loss.type", "kto", "--data.train_files", str(tiny / "kto.jsonl"), "--train.max_steps", "4"]
    rows = run(tiny, tmp_path / "live", *kto)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert rows[0]["kl"] != "" and float(rows[0]["kl"]) == pytest.approx(0, abs=1e-6)  # policy = reference
    assert float(rows[-1]["kl"]) > 1e-4  # the policy moved away from the reference on the mismatched rows too
    assert rows[0]["rewards/accuracies"] == ""
    precomputed = run(tiny, tmp_path / "precomputed", *kto, "--precompute_reference", "true")
    assert (tmp_path / "precomputed" / "reference_logps.safetensors").is_file()
    for a, b in zip(rows, precomputed, strict=True):
        for key in ("train_loss", "kl", "rewards/chosen", "rewards/rejected"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), key


def test_kto_learns_in_bfloat16_with_a_precomputed_reference(tiny, tmp_path):
    rows = run(tiny, tmp_path / "out", "--loss.type", "kto", "--data.train_files", str(tiny / "kto.jsonl"),
               "--precision", "bf16-true", "--precompute_reference", "true", "--train.max_steps", "6")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.02
    assert 0 < float(rows[-1]["rewards/chosen"]) - float(rows[-1]["rewards/rejected"])  # desirable pulled above


@pytest.mark.parametrize("config", ["align_dpo.yaml", "align_simpo.yaml"])
def test_config_hub_recipes_parse(config, capsys):
    recipe = Path(align.__file__).parent / "config_hub" / config
    with pytest.raises(SystemExit) as e:
        CLI(align.setup, args=["--config", str(recipe), "--print_config"], exit_on_error=False)
    assert not e.value.code
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["loss"]["type"] == yaml.safe_load(recipe.read_text())["loss"]["type"]
