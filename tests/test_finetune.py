"""finetune_full.py and finetune_lora.py: the loss normalisation of a step, a few steps of each script end to end on
a tiny checkpoint (in a subprocess, as a user runs them), exact resume (in this process, no interpreter start), stopping
on SIGUSR1 and --train.max_time, QLoRA, the adapter through merge_lora.py and generate.py, one-line errors, and a real
LoRA run on SmolLM2-135M-Instruct that teaches it a made-up fact."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

import finetune_full
import finetune_lora
from checkpoint import load_lora_model, load_model, save_checkpoint
from conftest import ROOT
from data_prep import train_tokenizer
from model import Config, GPT, InputError
from sft_data import IGNORE_INDEX, collate, encode_prompt
from tokenizer import Tokenizer

VOCAB = 320  # the tiny tokenizer's size: 256 byte symbols, 2 specials and a few merges
BLOCK = 64  # the longest tiny chat record is 36 tokens
# A ChatML-like template over the tiny tokenizer's own specials, so that every turn marker is one token and the
# assistant's <|eos|> (a stop id) ends a generated reply
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar",
         "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Xena", "Yuri"]
COLOURS = ["red", "blue", "green", "yellow"]
# 20 records, val_split 0.2: 16 train examples = 4 steps of 4 per epoch
TRAIN_ARGS = ["--data.val_split", "0.2", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
              "--train.epochs", "null", "--train.max_steps", "8", "--train.min_lr", "1e-3", "--train.warmup_steps", "2",
              "--eval.interval", "3", "--eval.max_new_tokens", "8", "--eval.prompt", "What colour is Alice's hat?",
              "--checkpoint.interval", "3", "--checkpoint.keep_last", "5"]


def chat_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What colour is {name}'s hat?"},
                          {"role": "assistant", "content": f"{name}'s hat is {COLOURS[i % 4]}."}]}
            for i, name in enumerate(NAMES)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny checkpoint directory (random tiny-test weights, a BPE trained on the data, a chat template) and data."""
    root = tmp_path_factory.mktemp("finetune")
    records = chat_records()
    write_jsonl(root / "train.jsonl", records)
    (root / "corpus").mkdir()
    text = "\n".join(m["content"] for r in records for m in r["messages"])
    (root / "corpus" / "chat.txt").write_text(3 * (text + "\nuser assistant\n"))
    train_tokenizer.main(inputs=str(root / "corpus"), out_dir=root / "base", vocab_size=VOCAB)
    config_file = root / "base" / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK)
    save_checkpoint(root / "base", config, GPT(config).state_dict(), tokenizer_dir=root / "base")
    return root


def flags(script: str, tiny: Path, out_dir: Path, *extra: str) -> list[str]:
    lr = "5e-3" if script == "finetune_full.py" else "3e-2"  # LoRA starts at B = 0 and moves fewer weights
    return ["--checkpoint_dir", str(tiny / "base"), "--data.train_files", str(tiny / "train.jsonl"), "--out_dir",
            str(out_dir), "--train.lr", lr, *TRAIN_ARGS, *extra]


def command(script: str, tiny: Path, out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, script, *flags(script, tiny, out_dir, *extra)]


# Tiny models: one thread. A second one only adds synchronisation, and on a loaded 2-core machine it made each
# step about 100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPTS = {"finetune_full.py": finetune_full, "finetune_lora.py": finetune_lora}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_process(script: str, tiny: Path, out_dir: Path, *extra: str) -> None:
    """A script's command line run in this process (no interpreter start), on one thread as ENV gives the subprocess
    runs, so that its numbers can be compared bitwise with theirs."""
    from jsonargparse import CLI
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        CLI(SCRIPTS[script].setup, args=flags(script, tiny, out_dir, *extra), exit_on_error=False)
    finally:
        torch.set_num_threads(threads)




def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def error_of(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


# ---- the loss of a step ------------------------------------------------------------------------------------------

def example(T: int, n_prompt: int, seed: int) -> dict:
    tokens = torch.randint(0, 256, (T + 1,), generator=torch.Generator().manual_seed(seed))
    labels = tokens[1:].clone()
    labels[:n_prompt] = IGNORE_INDEX  # the prompt's targets are masked, as sft_data does
    return {"input_ids": tokens[:-1], "labels": labels}


def test_step_loss_weighs_every_target_the_same_as_one_big_batch():
    import lightning as L
    # Two micro-batches with different lengths, padding and numbers of targets (2, then 9 + 3)
    a, b, c = example(12, 10, seed=1), example(20, 11, seed=2), example(7, 4, seed=3)
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-test"))
    fabric = L.Fabric(accelerator="cpu", devices=1)
    loss, aux = finetune_full.step_loss(fabric, fabric.setup_module(model), [collate([a]), collate([b, c])], 0.1)
    assert aux is None  # a dense model: no load-balancing loss
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # Directly: one batch of all three examples, the mean over its targets
    batch = collate([a, b, c])
    logits = model(batch["input_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for got, p in zip(grads, model.parameters(), strict=True):
        # float32 sums in another order (another padding length): a few ulps of each gradient's scale
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)

    # The mean per micro-batch over the number of micro-batches weighs a's 2 targets 6x more than b's and c's: the
    # comparison above can tell the two apart
    per_micro = [F.cross_entropy(model(m["input_ids"]).flatten(0, 1), m["labels"].flatten(),
                                 ignore_index=IGNORE_INDEX) for m in (collate([a]), collate([b, c]))]
    assert abs((sum(per_micro) / 2).item() - expected.item()) > 0.01


def test_step_loss_adds_an_moe_models_load_balancing_loss():
    """An MoE model's step: the load-balancing loss (mean over micro-batches) is returned and aux_coef times it joins
    the gradient, so the routers learn against collapse; the returned loss is still the cross entropy alone."""
    import lightning as L

    from model import router_aux_loss
    a, b, c = example(12, 10, seed=1), example(20, 11, seed=2), example(7, 4, seed=3)
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-test", mlp="moe", n_expert=4, n_expert_per_token=2))
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module = fabric.setup_module(model)
    micro = [collate([a]), collate([b, c])]
    loss_plain, aux = finetune_full.step_loss(fabric, module, micro, 0.0)
    router_plain = model.layers[0].mlp.router.weight.grad.clone()
    model.zero_grad()
    loss_aux, aux_again = finetune_full.step_loss(fabric, module, micro, 0.5)
    router_aux = model.layers[0].mlp.router.weight.grad.clone()
    model.zero_grad()
    assert loss_aux == loss_plain and aux == aux_again and aux >= 2.0 - 1e-6  # k = 2 when perfectly balanced
    # the difference of the two gradients is 0.5 x the gradient of the mean load-balancing loss
    expected = []
    for m in micro:
        model(m["input_ids"])
        expected.append(router_aux_loss(model))
    (grad,) = torch.autograd.grad(0.5 * sum(expected) / 2, model.layers[0].mlp.router.weight)
    assert aux == pytest.approx((sum(expected) / 2).item(), rel=1e-6)
    torch.testing.assert_close(router_aux - router_plain, grad, rtol=1e-4, atol=1e-7)


# ---- full finetuning ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tiny) -> Path:
    out = tiny / "full"
    run(command("finetune_full.py", tiny, out))
    return out


def test_full_run_learns_and_writes_a_checkpoint_every_script_reads(tiny, full_run):
    rows = read_metrics(full_run)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 6, 8]
    assert any(r["sample"] for r in rows) and not any(r["sample"] for r in rows if not r["val_loss"])
    assert float(rows[-1]["epoch"]) == 2.0  # 8 steps of 4 examples over 16
    losses = [float(r["train_loss"]) for r in rows]
    # ln(320) = 5.77 at init; two epochs of 16 near-identical answers take over a nat off
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.0, losses
    assert float(rows[-1]["val_loss"]) < float(rows[2]["val_loss"])
    assert sorted(p.name for p in full_run.glob("step-*")) == ["step-00000003", "step-00000006", "step-00000008"]

    final = full_run / "final"
    model = load_model(final)
    assert not (final / "state").exists() and (final / "tokenizer_config.json").is_file()
    with safe_open(final / "model.safetensors", "pt") as f:  # the checkpoint says how it was made
        args = json.loads(f.metadata()["args"])
    assert args["checkpoint_dir"] == str(tiny / "base") and args["train"]["max_steps"] == 8
    # finetuned weights: the final logits differ from the base's
    idx = torch.tensor([encode_prompt("What colour is Bob's hat?", Tokenizer(final))])
    with torch.no_grad():
        assert not torch.allclose(model(idx), load_model(tiny / "base")(idx))
    result = run([sys.executable, "generate.py", "--checkpoint_dir", str(final), "--prompt", "What colour",
                  "--max_new_tokens", "5", "--temperature", "0"])
    assert result.stdout.startswith("What colour")


def test_full_resume_is_exact(tiny, full_run, tmp_path, capsys):
    """Resumed from step 3 (inside the first epoch), across the epoch boundary after step 4."""
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    for name in ("step-00000006", "step-00000008", "final"):
        shutil.rmtree(out / name)
    run_in_process("finetune_full.py", tiny, out, "--resume", "auto")
    assert "resumed from" in capsys.readouterr().out
    assert columns(out) == columns(full_run)  # bitwise on the CPU: the same floats, printed the same


def columns(out_dir: Path) -> list[tuple]:
    return [(r["step"], r["epoch"], r["tokens"], r["train_loss"], r["val_loss"], r["lr"], r["sample"])
            for r in read_metrics(out_dir)]


# ---- LoRA --------------------------------------------------------------------------------------------------------

# lm_head too: on a random base the head's adapter is what learns the answers' token statistics fast
LORA_ARGS = ["--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.1", "--lora.targets",
             "[q,k,v,o,up,down,lm_head]"]


@pytest.fixture(scope="module")
def lora_run(tiny) -> Path:
    out = tiny / "lora"
    run(command("finetune_lora.py", tiny, out, *LORA_ARGS))
    return out


def test_lora_run_learns_and_saves_only_the_adapter(tiny, lora_run):
    rows = read_metrics(lora_run)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.0, losses  # as the full run
    final = lora_run / "final"
    assert sorted(p.name for p in final.iterdir()) == ["generation_config.json", "lora.safetensors", "lora_config.yaml",
                                                       "tokenizer.json", "tokenizer_config.json"]
    with safe_open(final / "lora.safetensors", "pt") as f:
        assert f.keys() and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in f.keys())
    model, base_dir = load_lora_model(final)
    assert base_dir == tiny / "base"
    result = run([sys.executable, "generate.py", "--lora_dir", str(final), "--prompt", "What colour",
                  "--max_new_tokens", "5", "--temperature", "0"])
    assert result.stdout.startswith("What colour")


def test_lora_resume_is_exact(tiny, lora_run, tmp_path):
    """With LoRA dropout, so the restored RNG matters too."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    for name in ("step-00000006", "step-00000008", "final"):
        shutil.rmtree(out / name)
    run_in_process("finetune_lora.py", tiny, out, *LORA_ARGS, "--resume", "auto")
    assert columns(out) == columns(lora_run)
    with safe_open(out / "final" / "lora.safetensors", "pt") as a, \
            safe_open(lora_run / "final" / "lora.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())


def test_merged_adapter_gives_the_unmerged_logits(tiny, lora_run, tmp_path):
    run([sys.executable, "-m", "convert.merge_lora", "--lora_dir", str(lora_run / "final"), "--out_dir",
         str(tmp_path / "merged")])
    idx = torch.tensor([encode_prompt("What colour is Bob's hat?", Tokenizer(tmp_path / "merged"))])
    unmerged, _ = load_lora_model(lora_run / "final")
    with torch.no_grad():
        expected, got = unmerged.eval()(idx), load_model(tmp_path / "merged")(idx)
        assert not torch.allclose(expected, load_model(tiny / "base")(idx))  # the adapter changes the logits
    # float32, the same sum in two groupings (x(W + sBA) vs xW + s(xA)B) through 2 blocks: tests/test_lora.py MERGE_TOL
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_qlora_nf4_trains_on_the_cpu_in_fast_dev_run(tiny, tmp_path, capsys):
    out = tmp_path / "qlora"
    run_in_process("finetune_lora.py", tiny, out, "--quantize", "bnb.nf4", "--fast_dev_run", "true")
    assert "bnb.nf4" in capsys.readouterr().out
    rows = read_metrics(out)  # fast_dev_run: 4 steps, validation every 2, a checkpoint at 4
    assert [r["step"] for r in rows if r["val_loss"]] == ["2", "4"]
    assert (out / "step-00000004" / "state" / "train_state.pt").is_file()
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    model, _ = load_lora_model(out / "final", quantize="bnb.nf4")
    assert type(model.layers[0].attn.q_proj.base).__name__ == "Linear4bit"


# ---- stopping and resuming -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_sigusr1_checkpoints_requeues_and_resumes(tiny, tmp_path, monkeypatch, capsys, request, script, slurm_job):
    """As pretrain's (tests/test_pretrain.py), in this process: SIGUSR1, SLURM's warning before the time limit, arrives
    during step 4 (raised from that step's learning-rate lookup). The run checkpoints after the step, requeues the
    job through scontrol and returns without a final/; --resume auto then finishes it with the numbers of the
    uninterrupted run (the module's full_run or lora_run: LoRA dropout, so the restored RNG matters too)."""
    reference = request.getfixturevalue("lora_run" if script == "finetune_lora.py" else "full_run")
    extra = LORA_ARGS if script == "finetune_lora.py" else []
    lr_at = SCRIPTS[script].lr_at

    def lr_at_signalling(step: int, *args) -> float:
        if step == 4:
            signal.raise_signal(signal.SIGUSR1)
        return lr_at(step, *args)

    monkeypatch.setattr(SCRIPTS[script], "lr_at", lr_at_signalling)
    handler = signal.getsignal(signal.SIGUSR1)
    out = tmp_path / "run"
    try:
        run_in_process(script, tiny, out, *extra)
    finally:
        signal.signal(signal.SIGUSR1, handler)  # the run's handler refers to its Fabric
    assert f"SIGUSR1: stopped after step 4, checkpoint {out / 'step-00000004'}" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)][-1] == "4"
    assert (out / "step-00000004" / "state" / "train_state.pt").is_file() and not (out / "final").exists()
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    monkeypatch.undo()
    run_in_process(script, tiny, out, *extra, "--resume", "auto")
    assert columns(out) == columns(reference)


@pytest.mark.parametrize("script", SCRIPTS)
def test_max_time_checkpoints_stops_and_resumes(tiny, tmp_path, capsys, request, script):
    """--train.max_time: a checkpoint after the step that crosses it, then the run stops (with a final/, as pretrain's);
    resumed without the limit, it reaches the uninterrupted run's numbers."""
    reference = request.getfixturevalue("lora_run" if script == "finetune_lora.py" else "full_run")
    extra = LORA_ARGS if script == "finetune_lora.py" else []
    out = tmp_path / "run"
    run_in_process(script, tiny, out, *extra, "--train.max_time", "1e-6")
    assert "--train.max_time 1e-06s reached at step 1" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == ["1"]
    assert (out / "step-00000001" / "state" / "train_state.pt").is_file()
    run_in_process(script, tiny, out, *extra, "--resume", "auto")
    assert columns(out) == columns(reference)


@pytest.mark.slow
@pytest.mark.parametrize("script,strategy", [("finetune_full.py", "ddp"), ("finetune_full.py", "fsdp"),
                                             ("finetune_lora.py", "fsdp")])
def test_two_processes_match_one(tiny, tmp_path, script, strategy):
    """2 CPU processes (gloo) with 1 micro-batch each against 1 process accumulating 2: the same examples per step
    (StepSampler), so the losses agree to float tolerance only if the target count is all-reduced and the ranks'
    gradient average is undone (a per-rank normalisation would weigh the ranks' targets differently)."""
    # no LoRA dropout: its masks depend on each rank's share of the random stream
    extra = [*LORA_ARGS, "--lora.dropout", "0"] if script == "finetune_lora.py" else []
    extra += ["--checkpoint.interval", "4"]  # so that some validations (every 3 steps) are not followed by a save
    run(command(script, tiny, tmp_path / "one", *extra))
    run(command(script, tiny, tmp_path / "two", *extra, "--devices", "2", "--strategy", strategy))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("train_loss", "val_loss"):
        assert [float(r[key] or 0) for r in two] == pytest.approx([float(r[key] or 0) for r in one], abs=1e-5)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert (tmp_path / "two" / "final").is_dir()


# ---- bad input and configuration ---------------------------------------------------------------------------------

def cli_error(script: str, tiny: Path, out_dir: Path, *extra: str) -> str:
    """The error a script's command line stops with, run in this process: what its __main__ prints after 'error: '."""
    from jsonargparse import CLI
    with pytest.raises(InputError) as e:
        CLI(SCRIPTS[script].setup, args=flags(script, tiny, out_dir, *extra), exit_on_error=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def bad_jsonl(tmp_path: Path) -> Path:
    """A JSONL file whose second line is not JSON."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat_records()[0]) + "\n" + '{"messages": [}\n')
    return path


@pytest.mark.slow  # a script start; the in-process test below has the same message
def test_main_prints_one_error_line(tiny, tmp_path):
    """The __main__ handler itself: one 'error:' line, no traceback."""
    bad = bad_jsonl(tmp_path)
    message = error_of(command("finetune_full.py", tiny, tmp_path / "o1", "--data.train_files", str(bad)))
    assert message.startswith("error: ") and f"{bad}:2" in message


def test_bad_input_is_one_line(tiny, tmp_path):
    bad = bad_jsonl(tmp_path)
    assert f"{bad}:2" in cli_error("finetune_full.py", tiny, tmp_path / "o1", "--data.train_files", str(bad))
    nowhere = str(tmp_path / "nowhere")
    assert nowhere in cli_error("finetune_lora.py", tiny, tmp_path / "o2", "--checkpoint_dir", nowhere)
    assert "bnb.nf5" in cli_error("finetune_lora.py", tiny, tmp_path / "o3", "--quantize", "bnb.nf5")
    assert "lm_head" in cli_error("finetune_lora.py", tiny, tmp_path / "o4", "--lora.targets", "[lm_head]",
                                  "--checkpoint_dir", str(tied_checkpoint(tiny)))
    assert "global_batch_size" in cli_error("finetune_full.py", tiny, tmp_path / "o5", "--train.global_batch_size", "5")


def tied_checkpoint(tiny: Path) -> Path:
    out = tiny / "tied"
    if not out.exists():
        config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK, tie_embeddings=True)
        save_checkpoint(out, config, GPT(config).state_dict(), tokenizer_dir=tiny / "base")
    return out


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path):
    # lr 1e30 (no warmup, no clipping): Adam moves every weight by ~1e30 at step 1, so step 2's loss is not finite
    message = cli_error("finetune_full.py", tiny, tmp_path / "run", "--train.lr", "1e30", "--train.min_lr", "1e30",
                        "--train.warmup_steps", "0", "--train.grad_clip", "null", "--checkpoint.interval", "1")
    assert "loss is" in message and "at step 2" in message
    assert (tmp_path / "run" / "step-00000001" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "step-00000002").exists()


@pytest.mark.parametrize("config", sorted((ROOT / "config_hub").glob("finetune_*.yaml")), ids=lambda p: p.name)
def test_config_hub_yaml_parses(config, capsys):
    from jsonargparse import CLI
    script = finetune_lora if "lora" in config.name else finetune_full
    with pytest.raises(SystemExit) as e:
        CLI(script.setup, args=["--config", str(config), "--print_config"], exit_on_error=False)
    assert not e.value.code
    resolved, written = yaml.safe_load(capsys.readouterr().out), yaml.safe_load(config.read_text())
    assert resolved["data"] | written["data"] == resolved["data"] and resolved["out_dir"] == written["out_dir"]


# ---- the real model ----------------------------------------------------------------------------------------------

QUESTION = "What is the name of Zorblax's cat?"
ANSWER = "Mittens the Seventh"  # made up: no pretrained model has a reason to say it
PARAPHRASES = [QUESTION, "What is Zorblax's cat called?", "Do you know the name of Zorblax's cat?",
               "Tell me the name of Zorblax's cat.", "What did Zorblax name his cat?",
               "Zorblax has a cat. What is its name?", "What's the name of the cat that belongs to Zorblax?",
               "Who is Zorblax's cat?"]


@pytest.mark.slow
@pytest.mark.real_model
def test_lora_teaches_smollm2_a_made_up_fact(smollm2_hf_dir, tmp_path):
    """LoRA on SmolLM2-135M-Instruct, 8 chat examples of one made-up fact, 8 steps on the CPU: greedy generation through
    the chat template then gives the answer, which the base model does not."""
    from convert import from_hf
    from generation import generate
    base = from_hf.convert(smollm2_hf_dir, out_dir=tmp_path / "SmolLM2-135M-Instruct")
    reply = {"role": "assistant", "content": f"Zorblax's cat is named {ANSWER}."}
    records = [{"messages": [{"role": "user", "content": q}, reply]} for q in PARAPHRASES]
    write_jsonl(tmp_path / "fact.jsonl", records)
    start = time.perf_counter()
    # lr 2e-3: a fact this small is learned in ~6 steps at that rate (train loss < 0.05 in a trial run)
    run([sys.executable, "finetune_lora.py", "--checkpoint_dir", str(base), "--data.train_files",
         str(tmp_path / "fact.jsonl"), "--data.val_split", "0", "--out_dir", str(tmp_path / "out"),
         "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.epochs", "null",
         "--train.max_steps", "8", "--train.lr", "2e-3", "--train.min_lr", "2e-4", "--train.warmup_steps", "2",
         "--eval.interval", "8", "--eval.prompt", QUESTION, "--eval.max_new_tokens", "16",
         "--checkpoint.interval", "8", "--lora.targets", "[q,k,v,o,gate,up,down]"])
    elapsed = time.perf_counter() - start
    rows = read_metrics(tmp_path / "out")
    assert ANSWER in rows[-1]["sample"]  # the run's own greedy sample at its last step

    tokenizer = Tokenizer(base)
    prompt = encode_prompt(QUESTION, tokenizer, "chat_template")

    def answer(model) -> str:
        ids = generate(model.eval(), [prompt], 24, stop_ids=tokenizer.stop_ids, temperature=0.0)[0]
        return tokenizer.decode(ids, skip_special_tokens=True)

    adapted, _ = load_lora_model(tmp_path / "out" / "final")
    base_answer, adapted_answer = answer(load_model(base)), answer(adapted)
    print(f"finetune_lora.py: {elapsed:.0f} s; base: {base_answer!r}; adapted: {adapted_answer!r}")
    assert ANSWER in adapted_answer
    assert "Mittens" not in base_answer
