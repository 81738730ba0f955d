"""Bad input gets one line naming the culprit, in every script: values that make no sense for their flag, unknown
model fields, files that exist but are corrupt or do not fit. Most cases run the script's command line in this
process (what its __main__ prints after 'error: '); a few real runs prove __main__ prints that one line."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import CLI

import distill
import evaluate
import finetune_full
import finetune_lora
import generate
import pretrain
from checkpoint import save_checkpoint, save_lora
from conftest import ROOT
from convert import from_hf, merge_lora, to_hf
from data_prep import prepare_slimpajama, prepare_starcoder, prepare_stdlib, prepare_text, train_tokenizer
from model import GPT, Config, InputError, LoRAConfig, add_lora, lora_state_dict
from test_pretrain import write_corpus

VOCAB, BLOCK = 320, 32  # the tiny tokenizer's size (256 byte symbols, 2 specials and a few merges); a short block


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Litdata chunks, a trained toy tokenizer, a tiny checkpoint and copies of it that are broken in one way each."""
    root = tmp_path_factory.mktemp("bad_input")
    corpus = write_corpus(root / "corpus", n_files=4)
    train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=VOCAB)
    prepare_text.main(inputs=str(corpus), tokenizer_dir=root / "tokenizer", out_dir=root / "chunks", workers=1,
                      val_fraction=0.0)
    torch.manual_seed(0)
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK)
    save_checkpoint(root / "base", config, GPT(config).state_dict(), tokenizer_dir=root / "tokenizer")
    # weights of a wider MLP than model_config.yaml says: what a config edited after saving looks like
    wider = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=BLOCK,
                             intermediate_size=2 * config.intermediate_size)
    save_checkpoint(root / "mismatched", config, GPT(wider).state_dict(), tokenizer_dir=root / "tokenizer")
    # a step checkpoint of that other shape, with a readable training state, in a run's out_dir
    save_checkpoint(root / "run_mismatched" / "step-00000004", wider, GPT(wider).state_dict(),
                    tokenizer_dir=root / "tokenizer", train_state=dict(step=4))
    save_checkpoint(root / "run_truncated" / "step-00000004", config, GPT(config).state_dict(),
                    tokenizer_dir=root / "tokenizer", train_state=dict(step=4, tokens=0, train_time=0.0))
    state = root / "run_truncated" / "step-00000004" / "state" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])
    (root / "wrong_type").mkdir()
    for f in (root / "base").iterdir():
        (root / "wrong_type" / f.name).write_bytes(f.read_bytes())
    config_file = root / "wrong_type" / "model_config.yaml"
    config_file.write_text(config_file.read_text().replace("n_layer: 2", "n_layer: two"))
    (root / "not_json").mkdir()
    (root / "not_json" / "index.json").write_text('{"chunks": [')
    # an adapter to merge, and a LoRA step checkpoint of rank 2 (the default --lora.r is 8) on a base whose block
    # holds finetuning's Alpaca prompts
    model = GPT(config)
    add_lora(model, LoRAConfig(r=2))
    save_lora(root / "lora", LoRAConfig(r=2), lora_state_dict(model), root / "base", root / "tokenizer")
    up = GPT(config)
    add_lora(up, LoRAConfig(r=2, targets=("up",)))  # fits a base of this config only: the wider MLP's is 256 wide
    save_lora(root / "lora_up", LoRAConfig(r=2, targets=("up",)), lora_state_dict(up), root / "base",
              root / "tokenizer")
    longer = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=256)
    save_checkpoint(root / "base256", longer, GPT(longer).state_dict(), tokenizer_dir=root / "tokenizer")
    save_lora(root / "lora_run" / "step-00000004", LoRAConfig(r=2), lora_state_dict(model), root / "base256",
              root / "tokenizer", train_state=dict(step=4, tokens=0, train_time=0.0))
    to_hf.convert(root / "base", out_dir=root / "hf")
    save_checkpoint(root / "run" / "final", config, GPT(config).state_dict(), tokenizer_dir=root / "tokenizer")
    (root / "sft.jsonl").write_text("".join(json.dumps(dict(instruction=f"say {i}", output=f"{i} " * 3)) + "\n"
                                            for i in range(8)))
    write_corpus(root / "nested" / "train", n_files=2)  # a corpus in a folder named like a split
    # a distillation run's teacher cache whose meta.json was cut short
    (root / "cache" / "train-0").mkdir(parents=True)
    (root / "cache" / "train-0" / "meta.json").write_text('{"teacher": ')
    return root


def digest(path: Path) -> dict[str, str]:
    """Every file under path with its hash: a script that stops on bad input leaves good files as they were."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def pretrain_args(tiny: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--model.name", "tiny-test", "--model.overrides", json.dumps(dict(vocab_size=VOCAB, block_size=BLOCK)),
            "--data.train_dirs", json.dumps([str(tiny / "chunks" / "train")]), "--data.val_dir", "null",
            "--data.num_workers", "0", "--tokenizer_dir", str(tiny / "tokenizer"), "--out_dir", str(tmp_path / "out"),
            "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.max_steps", "2", *extra]


def script_args(script, tiny: Path, tmp_path: Path, *extra: str) -> list[str]:
    if script is pretrain:
        return pretrain_args(tiny, tmp_path, *extra)
    if script is distill:
        return ["--teacher_dir", str(tiny / "base"), "--student_dir", str(tiny / "base"),
                "--out_dir", str(tmp_path / "out"), *extra]
    if script in (train_tokenizer, prepare_text):
        return ["--inputs", str(tiny / "corpus"), "--out_dir", str(tmp_path / "out"),
                *(["--tokenizer_dir", str(tiny / "tokenizer")] if script is prepare_text else []), *extra]
    if script in (finetune_full, finetune_lora):
        return ["--checkpoint_dir", str(tiny / "base"), "--out_dir", str(tmp_path / "out"), *extra]
    return ["--checkpoint_dir", str(tiny / "base"), *extra]  # generate, evaluate


def cli_error(script, args: list[str]) -> str:
    """The error a script's command line stops with, run in this process: what its __main__ prints after 'error: '."""
    entry = getattr(script, "setup", None) or script.main
    kwargs = dict(as_positional=False) if script is distill else {}
    with pytest.raises(InputError) as e:
        CLI(entry, args=args, exit_on_error=False, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# (script, flags, what the one line must say): values that make no sense for their flag
BAD_VALUES = [
    (pretrain, ["--train.micro_batch_size", "0"], "--train.micro_batch_size 0: expected a positive integer"),
    (pretrain, ["--train.lr", "-0.01"], "--train.lr -0.01: expected a positive learning rate"),
    (pretrain, ["--train.max_steps", "-1"], "--train.max_steps -1: expected a positive integer"),
    (pretrain, ["--train.betas", "[0.9, 1.5]"], "--train.betas [0.9, 1.5]: expected two numbers in [0, 1)"),
    (pretrain, ["--checkpoint.keep_last", "0"], "--checkpoint.keep_last 0: expected at least 1"),
    (pretrain, ["--eval.interval", "0"], "--eval.interval 0: expected steps >= 1"),
    (pretrain, ["--data.weights", "[1.0, 2.0]"], "--data.weights [1.0, 2.0]: expected one positive weight per"),
    (pretrain, ["--model.name", "tiny-tset"], "--model.name tiny-tset"),
    (pretrain, ["--model.overrides", '{"n_layers": 4}'], "unknown Config field(s) ['n_layers']"),
    (pretrain, ["--model.overrides", '{"vocab_size": -5}'], "vocab_size -5: expected a positive integer"),
    (pretrain, ["--model.overrides", '{"n_embd": "wide"}'], "n_embd 'wide': expected int"),
    (finetune_full, ["--train.micro_batch_size", "0"], "--train.micro_batch_size 0: expected a positive integer"),
    (finetune_full, ["--train.lr", "-0.01"], "--train.lr -0.01: expected a positive learning rate"),
    (finetune_full, ["--data.max_seq_length", "-5"], "--data.max_seq_length -5: expected at least 2 tokens"),
    (finetune_full, ["--data.val_split", "1.5"], "--data.val_split 1.5: expected a fraction in [0, 1)"),
    (finetune_full, ["--eval.max_new_tokens", "-1"], "--eval.max_new_tokens -1: expected a positive integer"),
    (finetune_lora, ["--train.epochs", "0"], "--train.epochs 0: expected a positive integer"),
    (finetune_lora, ["--lora.r", "0"], "--lora.r 0: expected a rank of at least 1"),
    (finetune_lora, ["--lora.targets", "[foo]"], "--lora.targets ['foo']: unknown target(s) ['foo']"),
    (finetune_lora, ["--lora.dropout", "1.0"], "--lora.dropout 1.0: expected a probability in [0, 1)"),
    (distill, ["--train.micro_batch_size", "0"], "--train.micro_batch_size 0: expected a positive integer"),
    (distill, ["--on_policy.temperature", "-1"], "--on_policy.temperature -1.0: expected 0 (greedy) or more"),
    (distill, ["--student_dir", "null", "--student_config", "tiny-test", "--student_overrides", '{"n_layers": 1}'],
     "--student_config tiny-test: unknown Config field(s) ['n_layers']"),
    (generate, ["--temperature", "-1"], "--temperature -1.0: expected 0 (greedy) or more"),
    (generate, ["--max_new_tokens", "-3"], "--max_new_tokens -3: expected a positive integer"),
    (generate, ["--top_p", "0"], "--top_p 0.0: expected a probability in (0, 1]"),
    (generate, ["--top_k", "0"], "--top_k 0: expected a positive integer"),
    (evaluate, ["--data", "README.md", "--stride", "0"], "--stride 0: expected a positive number of tokens"),
    (evaluate, ["--data", "README.md", "--batch_size", "0"], "--batch_size 0: expected a positive integer"),
    (train_tokenizer, ["--vocab_size", "-5"], "--vocab_size -5: expected at least 258"),
    (prepare_text, ["--val_fraction", "1.5"], "--val_fraction 1.5: expected a fraction in [0, 1)"),
    (prepare_text, ["--workers", "0"], "--workers 0: expected a positive number of processes"),
]


@pytest.mark.parametrize("script,flags,message", BAD_VALUES,
                         ids=[f"{s.__name__}{' '.join(f)}" for s, f, _ in BAD_VALUES])
def test_a_value_that_makes_no_sense_names_its_flag(tiny, tmp_path, script, flags, message):
    before = digest(tiny / "base")
    assert message in cli_error(script, script_args(script, tiny, tmp_path, *flags))
    assert digest(tiny / "base") == before and not (tmp_path / "out").exists()  # stopped before any work


# (script, flags given the fixture's root, the file the line must name, what else it must say): files that exist
# but are corrupt or do not fit the configured model
BAD_FILES = [
    (pretrain, lambda t: ["--data.train_dirs", json.dumps([str(t / "not_json")])], "not_json/index.json",
     "invalid JSON"),
    (pretrain, lambda t: ["--initial_checkpoint_dir", str(t / "mismatched")], "mismatched/model.safetensors",
     "model_config.yaml implies"),
    (pretrain, lambda t: ["--resume", str(t / "run_mismatched" / "step-00000004")],
     "step-00000004/model.safetensors", "model_config.yaml implies"),
    (pretrain, lambda t: ["--resume", str(t / "run_truncated" / "step-00000004")], "state/train_state.pt",
     "not a readable training state"),
    (pretrain, lambda t: ["--initial_checkpoint_dir", str(t / "wrong_type")], "wrong_type/model_config.yaml",
     "n_layer 'two': expected int"),
    (distill, lambda t: ["--data.train_dirs", json.dumps([str(t / "chunks" / "train")]), "--data.val_dir", "null",
                         "--data.num_workers", "0", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                         "--resume", str(t / "run_mismatched" / "step-00000004")],
     "step-00000004/model.safetensors", "model_config.yaml implies"),
    (distill, lambda t: ["--data.train_dirs", json.dumps([str(t / "not_json")])], "not_json/index.json",
     "invalid JSON"),
    (generate, lambda t: ["--checkpoint_dir", str(t / "wrong_type")], "wrong_type/model_config.yaml",
     "n_layer 'two': expected int"),
    (evaluate, lambda t: ["--data", str(t / "not_json")], "not_json/index.json", "invalid JSON"),
    (finetune_lora, lambda t: ["--checkpoint_dir", str(t / "base256"), "--data.train_files", str(t / "sft.jsonl"),
                               "--data.val_split", "0",
                               "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                               "--resume", str(t / "lora_run" / "step-00000004")],
     "step-00000004/lora.safetensors", "has shape (2, 64), lora_config.yaml and the base model implies (8, 64)"),
    (distill, lambda t: ["--data.train_dirs", json.dumps([str(t / "chunks" / "train")]), "--data.val_dir", "null",
                         "--teacher_topk_dir", str(t / "cache")],
     "cache/train-0/meta.json", "invalid JSON"),
    (evaluate, lambda t: ["--data", str(t / "corpus"), "--out", str(t / "corpus")], "--out",
     "not a directory"),
]


@pytest.mark.parametrize("script,flags,culprit,message", BAD_FILES,
                         ids=[f"{s.__name__}-{c}" for s, _, c, _ in BAD_FILES])
def test_a_corrupt_or_unfitting_file_is_named(tiny, tmp_path, script, flags, culprit, message):
    before = digest(tiny)
    error = cli_error(script, script_args(script, tiny, tmp_path, *flags(tiny)))
    assert culprit in error and message in error, error
    assert digest(tiny) == before


# (script, its arguments given the fixture's root and the output directory's parent): an output directory that is,
# or holds, what the run reads would be replaced by its output
OUTPUT_OVER_INPUT = [
    (to_hf, lambda t, o: [str(t / "base"), "--out_dir", str(t / "base")], "base"),
    (to_hf, lambda t, o: [str(t / "base"), "--out_dir", str(t)], "base"),
    (from_hf, lambda t, o: [str(t / "hf"), "--out_dir", str(t / "hf")], "hf"),
    (merge_lora, lambda t, o: ["--lora_dir", str(t / "lora"), "--out_dir", str(t / "base")], "base"),
    (train_tokenizer, lambda t, o: ["--inputs", str(t / "corpus"), "--out_dir", str(t / "corpus"),
                                    "--vocab_size", str(VOCAB)], "corpus"),
    (prepare_text, lambda t, o: ["--inputs", str(t / "nested"), "--tokenizer_dir", str(t / "tokenizer"),
                                 "--out_dir", str(t / "nested")], "nested/train"),
    (finetune_full, lambda t, o: ["--checkpoint_dir", str(t / "run" / "final"), "--out_dir", str(t / "run")], "final"),
    (pretrain, lambda t, o: pretrain_args(t, o, "--initial_checkpoint_dir", str(t / "run" / "final"),
                                          "--out_dir", str(t / "run")), "final"),
]


@pytest.mark.parametrize("script,args,culprit", OUTPUT_OVER_INPUT,
                         ids=[f"{s.__name__.split('.')[-1]}-{i}" for i, (s, _, _) in enumerate(OUTPUT_OVER_INPUT)])
def test_an_output_directory_never_replaces_an_input(tiny, tmp_path, script, args, culprit):
    """Before: convert/to_hf.py CHECKPOINT --out_dir CHECKPOINT replaced the user's checkpoint with the export."""
    before = digest(tiny)
    entry = getattr(script, "setup", None) or getattr(script, "main", None) or getattr(script, "merge", None) \
        or script.convert
    with pytest.raises(InputError) as e:
        CLI(entry, args=args(tiny, tmp_path), exit_on_error=False, as_positional=script in (to_hf, from_hf))
    assert "which this run reads" in str(e.value) and culprit in str(e.value), str(e.value)
    assert digest(tiny) == before


# (script, its arguments given the fixture's root and an empty directory, what the line must say): the data preparation
# and conversion scripts' inputs, missing or not what they should be
BAD_SOURCES = [
    (prepare_slimpajama, lambda t, e: ["--input_dir", str(t / "nope"), "--tokenizer_dir", str(t / "tokenizer")],
     "nope/train: no such file or directory"),
    (prepare_starcoder, lambda t, e: ["--input_dir", str(e), "--tokenizer_dir", str(t / "tokenizer")],
     "no input files found in " + "{empty} matching '*.parquet'"),
    (prepare_stdlib, lambda t, e: ["--vocab_size", "5"], "--vocab_size 5: expected at least 258"),
    (prepare_text, lambda t, e: ["--inputs", str(t / "corpus"), "--tokenizer_dir", str(e), "--out_dir", str(e / "x")],
     "{empty}/tokenizer.json: not found"),
    (to_hf, lambda t, e: [str(e), "--out_dir", str(e / "hf")], "{empty}/model_config.yaml: not found"),
    (from_hf, lambda t, e: [str(t / "base"), "--out_dir", str(e / "x")], "base/config.json: not found"),
    (merge_lora, lambda t, e: ["--lora_dir", str(t / "base"), "--out_dir", str(e / "x")],
     "base/lora_config.yaml: not found"),
    (merge_lora, lambda t, e: ["--lora_dir", str(t / "lora_up"), "--base_dir",
                               str(t / "run_mismatched" / "step-00000004"), "--out_dir", str(e / "x")],
     "lora_up/lora.safetensors: layers.0.mlp.up_proj.lora_B has shape (128, 2), lora_config.yaml and the base model "
     "implies (256, 2)"),
]


@pytest.mark.parametrize("script,args,message", BAD_SOURCES,
                         ids=[f"{s.__name__.split('.')[-1]}-{i}" for i, (s, _, _) in enumerate(BAD_SOURCES)])
def test_a_missing_or_unfitting_source_is_named(tiny, tmp_path, script, args, message):
    before = digest(tiny)
    entry = getattr(script, "main", None) or getattr(script, "merge", None) or script.convert
    with pytest.raises(InputError) as e:
        CLI(entry, args=args(tiny, tmp_path), exit_on_error=False, as_positional=script in (to_hf, from_hf))
    assert "\n" not in str(e.value) and message.format(empty=tmp_path) in str(e.value), str(e.value)
    assert digest(tiny) == before and sorted(tmp_path.iterdir()) == []


def test_a_jsonl_line_without_the_text_field_is_one_line_from_a_worker(tiny, tmp_path):
    """The check runs in litdata's worker processes, which wrap what they raise in their own traceback."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part{i}.jsonl").write_text("".join(json.dumps(dict(text=f"document {j}")) + "\n" for j in range(5)))
    with open(corpus / "part1.jsonl", "a") as f:
        f.write(json.dumps(dict(txt="the wrong field")) + "\n")
    with pytest.raises(InputError) as e:
        prepare_text.main(inputs=str(corpus), tokenizer_dir=tiny / "tokenizer", out_dir=tmp_path / "out", workers=2,
                          val_fraction=0.0)
    assert str(e.value) == f"{corpus / 'part1.jsonl'}:6: expected a JSON object with a 'text' string field"
    assert not (tmp_path / "out" / "train").exists()


def test_a_wrong_type_in_model_config_yaml_names_the_field(tiny):
    data = yaml.safe_load((tiny / "wrong_type" / "model_config.yaml").read_text())
    with pytest.raises(InputError, match="n_layer 'two': expected int"):
        Config(**data)


def test_a_wrong_type_in_a_transformers_config_json_names_the_file(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    # a Llama config.json as tiny_hf writes one, with the layer count as text; no weights needed: it fails first
    (hf / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers="two", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)))
    with pytest.raises(InputError) as e:
        CLI(from_hf.convert, args=[str(hf), "--out_dir", str(tmp_path / "out")], as_positional=True,
            exit_on_error=False)
    assert str(e.value) == f"{hf / 'config.json'}: n_layer 'two': expected int"
    assert not (tmp_path / "out").exists()


def test_evaluate_stride_zero_is_an_error_not_the_default(tiny, tmp_path):
    """Before: --stride 0 quietly meant max_seq_length // 2 (`stride or ...`)."""
    error = cli_error(evaluate, script_args(evaluate, tiny, tmp_path, "--data", str(tiny / "corpus"), "--stride", "0"))
    assert error.startswith("--stride 0:")


def test_distill_lora_error_is_the_cause_its_main_prints(tiny, tmp_path):
    """distill's --lora is `LoRAConfig | None`: jsonargparse wraps the LoRAConfig error in a ValueError about the Union
    (several lines); distill's __main__ prints the cause (a real run below)."""
    with pytest.raises(ValueError) as e:
        CLI(distill.setup, args=script_args(distill, tiny, tmp_path, "--lora.targets", "[foo]"), exit_on_error=False,
            as_positional=False)
    assert isinstance(e.value.__cause__, InputError) and str(e.value.__cause__).startswith("--lora.targets ['foo']")


@pytest.mark.slow  # four script starts (~45 s on 2 cores); the in-process tables above cover the messages
@pytest.mark.parametrize("script,flags,culprit", [
    ("pretrain.py", ["--train.micro_batch_size", "0"], "--train.micro_batch_size 0"),  # InputError
    ("distill.py", ["--lora.r", "0"], "--lora.r 0"),  # InputError, through jsonargparse's Union error
    ("generate.py", ["--temperature", "-1"], "--temperature -1.0"),  # a check at the top of main()
    ("evaluate.py", ["--data", "README.md", "--stride", "0"], "--stride 0"),  # its own argv handling (gather_nargs)
])
def test_main_prints_one_error_line(tiny, tmp_path, script, flags, culprit):
    """The __main__ path itself: exit code 1, no traceback, one 'error:' line naming the flag."""
    module = {"pretrain.py": pretrain, "distill.py": distill, "generate.py": generate, "evaluate.py": evaluate}[script]
    result = subprocess.run([sys.executable, script, *script_args(module, tiny, tmp_path, *flags)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {culprit}"), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # a parse-time error: nothing written
