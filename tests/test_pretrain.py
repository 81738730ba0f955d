"""data_prep and pretrain.py end to end on a tiny corpus: the reference run and what needs a process of its own (a
kill, a signal, several ranks) in subprocesses as a user runs them, the rest in this process (no interpreter start)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import CLI
from safetensors import safe_open

import pretrain
from checkpoint import load_model
from conftest import ROOT
from data_prep import prepare_text, train_tokenizer
from model import InputError
from tokenizer import Tokenizer

VOCAB = 320  # the tiny tokenizer's size: 256 byte symbols, 2 specials and a few merges


def write_corpus(path: Path, n_files: int = 12) -> Path:
    path.mkdir(parents=True)
    for i in range(n_files):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)]
        (path / f"module_{i}.py").write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus")
    (corpus / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: skipped with a warning
    with pytest.warns(UserWarning, match="latin1.py"):
        train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=VOCAB)
    # (prepare_text's workers are separate processes: their warning goes to stderr; the count test checks the skip)
    prepare_text.main(inputs=str(corpus), tokenizer_dir=root / "tokenizer", out_dir=root / "chunks",
                      workers=1, val_fraction=0.2)
    return root


def pretrain_cmd(data: Path, out_dir: Path, *extra: str, steps: int = 36) -> list[str]:
    return [sys.executable, "pretrain.py", *pretrain_args(data, out_dir, *extra, steps=steps)]


def pretrain_args(data: Path, out_dir: Path, *extra: str, steps: int = 36) -> list[str]:
    return ["--model.name", "tiny-test",
            "--model.overrides", json.dumps(dict(vocab_size=VOCAB, block_size=32)),
            "--data.train_dirs", json.dumps([str(data / "chunks" / "train")]),
            "--data.val_dir", str(data / "chunks" / "val"), "--data.num_workers", "1",
            "--tokenizer_dir", str(data / "tokenizer"), "--out_dir", str(out_dir),
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
            "--train.lr", "1e-2", "--train.min_lr", "1e-3", "--train.warmup_steps", "2",
            "--eval.interval", "10", "--eval.max_batches", "2", "--checkpoint.interval", "10",
            "--checkpoint.keep_last", "5", *extra]


# Tiny models: one thread, in subprocesses and in this process alike (so that their numbers compare bitwise). A second
# one only adds synchronisation, and on a loaded 2-core machine it made steps many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, **kwargs):
    kwargs.setdefault("env", ENV)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_process(data: Path, out_dir: Path, *extra: str, steps: int = 36) -> None:
    """pretrain.py's command line in this process: its numbers are those of a subprocess run (one thread, as ENV
    gives them, and the same seeds), compared bitwise with straight_run's below."""
    handler, threads = signal.getsignal(signal.SIGUSR1), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        CLI(pretrain.setup, args=pretrain_args(data, out_dir, *extra, steps=steps), exit_on_error=False)
    finally:
        signal.signal(signal.SIGUSR1, handler)  # the run's handler refers to its Fabric
        torch.set_num_threads(threads)


def cli_error(args: list[str], entry=pretrain.setup) -> str:
    """The error a command line stops with, run in this process: what its __main__ prints after 'error: '."""
    with pytest.raises((InputError, ArgumentError)) as e:
        CLI(entry, args=args, exit_on_error=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_chunks_read_back_equal_the_tokenized_documents(tiny_data):
    from litdata import StreamingDataset, TokensLoader
    tokenizer = Tokenizer(tiny_data / "tokenizer")
    documents = sum(prepare_text.count(tiny_data / "chunks" / split)[0] for split in ("train", "val"))
    assert documents == 12  # the latin-1 file was skipped
    stream = torch.cat([StreamingDataset(str(tiny_data / "chunks" / split), item_loader=TokensLoader(block_size=1))[i]
                        for split in ("train", "val")
                        for i in range(len(StreamingDataset(str(tiny_data / "chunks" / split),
                                                            item_loader=TokensLoader(block_size=1))))])
    expected = []
    for i in range(12):
        text = (tiny_data / "corpus" / f"module_{i}.py").read_text()
        expected.append([tokenizer.bos_id, *tokenizer.encode(text, bos=False), tokenizer.eos_id])
    # each document is stored whole and in order; which split a file went to does not matter here
    docs, current = [], []
    for token in stream.tolist():
        current.append(token)
        if token == tokenizer.eos_id:
            docs.append(current)
            current = []
    assert sorted(docs) == sorted(expected)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".parquet"])
def test_prepare_text_reads_each_format(tmp_path, tiny_data, suffix):
    texts = [f"record number {i}: " + "lorem ipsum " * i for i in range(1, 6)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"content": texts}), path)
    else:
        lines = "".join(json.dumps({"content": t}) + "\n" for t in texts).encode()
        if suffix.endswith(".zst"):
            import zstandard
            lines = zstandard.ZstdCompressor().compress(lines)
        path.write_bytes(lines)
    prepare_text.main(inputs=str(path), tokenizer_dir=tiny_data / "tokenizer", out_dir=tmp_path / "out",
                      text_field="content", workers=1, val_fraction=0.0)
    tokenizer = Tokenizer(tiny_data / "tokenizer")
    assert prepare_text.count(tmp_path / "out" / "train") == (5, sum(len(tokenizer.encode(t, bos=False)) + 2
                                                                      for t in texts))


def test_malformed_jsonl_names_file_and_line(tmp_path, tiny_data):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    result = subprocess.run([sys.executable, "-m", "data_prep.prepare_text", "--inputs", str(tmp_path / "bad.jsonl"),
                             "--tokenizer_dir", str(tiny_data / "tokenizer"), "--out_dir", str(tmp_path / "out"),
                             "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert f"{tmp_path / 'bad.jsonl'}:2" in result.stderr and "'text'" in result.stderr


def test_prepare_text_writes_the_same_chunks_every_time(tiny_data, tmp_path):
    """Two workers, many files, small chunks: litdata's shared work queue handed files to whichever worker came free,
    so the chunks (and the order pretraining reads them in) differed between two preparations of one corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(30 + 5 * i)))
    chunks = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        prepare_text.main(inputs=str(corpus), tokenizer_dir=tiny_data / "tokenizer", out_dir=out, workers=2,
                          chunk_bytes="4kB", val_fraction=0.0)
        files = sorted((out / "train").glob("*.bin"))
        assert len(files) > 4  # several chunks, each worker writing some
        chunks.append([(f.name, f.read_bytes()) for f in files])
    assert chunks[0] == chunks[1]


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(pretrain_cmd(tiny_data, out))
    return out


def test_pretrain_writes_metrics_checkpoints_and_a_final_model(straight_run):
    rows = read_metrics(straight_run)
    assert [int(r["step"]) for r in rows] == list(range(1, 37))
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "mfu", "router_aux_loss"} <= set(
        rows[0])
    assert all(0 < float(r["mfu"]) <= 1 for r in rows)  # a fraction of the stated peak
    assert not any(r["router_aux_loss"] for r in rows)  # a dense model has no load-balancing loss
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [10, 20, 30, 36]
    assert int(rows[-1]["tokens"]) == 36 * 8 * 32  # steps x global batch x block
    assert sorted(p.name for p in straight_run.glob("step-*")) == [f"step-{s:08d}" for s in (10, 20, 30, 36)]
    # weight decay on matmul weights only: never on the embedding, norms or biases
    groups = torch.load(straight_run / "step-00000036" / "state" / "train_state.pt", weights_only=True)[
        "optimizer"]["param_groups"]
    decayed = {name for g in groups if g["weight_decay"] > 0 for name in g["params"]}
    assert decayed and all(n.endswith(("proj.weight", "lm_head.weight")) for n in decayed), decayed
    assert "embed.weight" in {name for g in groups if g["weight_decay"] == 0 for name in g["params"]}
    model = load_model(straight_run / "final")  # the final directory is a checkpoint every script reads
    assert model.config.vocab_size == VOCAB
    with safe_open(straight_run / "step-00000036" / "model.safetensors", "pt") as f:  # it says how it was made
        args = json.loads(f.metadata()["args"])
    assert args["train"]["max_steps"] == 36 and args["model"]["name"] == "tiny-test"
    assert (straight_run / "final" / "tokenizer.json").is_file()
    assert (straight_run / "report.png").stat().st_size > 0  # the run's metrics drawn at its end (report.py)


def test_continued_pretraining_starts_from_the_checkpoint(tiny_data, straight_run, tmp_path):
    run_in_process(tiny_data, tmp_path / "run", "--initial_checkpoint_dir", str(straight_run / "final"), steps=2)
    first = float(read_metrics(tmp_path / "run")[0]["train_loss"])
    assert first < float(read_metrics(straight_run)[0]["train_loss"]) - 2.0  # far below a fresh model's ln(320)


def test_mixture_activation_checkpointing_and_max_time(tiny_data, straight_run, tmp_path):
    train = str(tiny_data / "chunks" / "train")
    # two weighted sources (here the same chunks twice: the mixture path, not its statistics, is under test)
    run_in_process(tiny_data, tmp_path / "mix", "--data.train_dirs", json.dumps([train, train]),
                   "--data.weights", "[0.7, 0.3]", steps=3)
    assert len(read_metrics(tmp_path / "mix")) == 3
    # recomputing activations in the backward pass changes memory, not numbers
    run_in_process(tiny_data, tmp_path / "ac", "--activation_checkpointing", "true", steps=36)
    assert losses(tmp_path / "ac") == losses(straight_run)
    # max_time: checkpoint and stop after the step that crosses it
    run_in_process(tiny_data, tmp_path / "timed", "--train.max_time", "0.000001")
    assert len(read_metrics(tmp_path / "timed")) == 1
    assert (tmp_path / "timed" / "step-00000001" / "state" / "train_state.pt").is_file()


def test_loss_falls_on_a_tiny_repeated_set(tiny_data, tmp_path):
    run_in_process(tiny_data, tmp_path / "run", steps=40)  # past one epoch (27 steps)
    losses = [float(r["train_loss"]) for r in read_metrics(tmp_path / "run")]
    # ln(320) = 5.77 at init; 40 steps on 12 near-identical files must take well over a nat off
    assert losses[0] > 5.0 and max(losses[-5:]) < losses[0] - 2.0


def test_resume_is_exact(tiny_data, straight_run, tmp_path, capsys):
    """Resumes from step 30, inside the second epoch (the train split holds 27 steps of samples)."""
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    shutil.rmtree(out / "step-00000036")
    shutil.rmtree(out / "final")
    run_in_process(tiny_data, out, "--resume", "auto")
    assert "resumed from" in capsys.readouterr().out
    assert losses(out) == losses(straight_run)  # bitwise on CPU: the same floats, printed the same


def test_killed_run_resumes_to_the_same_numbers(tiny_data, straight_run, tmp_path):
    """Killed after step 10, resumed across the epoch boundary at step 27."""
    out = tmp_path / "run"
    process = subprocess.Popen(pretrain_cmd(tiny_data, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300  # generous: a loaded 2-core machine starts Python slowly
    while not (out / "step-00000010" / "state" / "train_state.pt").is_file():
        assert time.time() < deadline and process.poll() is None, "the run never reached its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # a checkpoint that a kill interrupted mid-write keeps its temporary name and is never resumed from
    (out / ".step-00000020.tmp-killed").mkdir(exist_ok=True)
    run_in_process(tiny_data, out, "--resume", "auto")
    assert losses(out) == losses(straight_run)
    assert (out / "final" / "model.safetensors").is_file()


def test_sigusr1_checkpoints_requeues_and_resumes(tiny_data, straight_run, tmp_path):
    """SLURM's warning before the time limit (SIGUSR1, as config_hub/slurm/pretrain.sbatch asks for): the run
    checkpoints after the step it is in, requeues the job through scontrol and exits cleanly; --resume auto then
    finishes it with the uninterrupted run's numbers."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.txt"}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = dict(ENV, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    out = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(pretrain_cmd(tiny_data, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
        deadline = time.time() + 300
        while not (out / "step-00000010" / "state" / "train_state.pt").is_file():
            assert time.time() < deadline and process.poll() is None, "the run never reached its first checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)
        assert process.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    stopped_at = int(read_metrics(out)[-1]["step"])
    assert 10 <= stopped_at < 36, "the run finished before the signal: nothing was tested"
    assert f"stopped after step {stopped_at}" in (tmp_path / "log.txt").read_text()
    assert (out / f"step-{stopped_at:08d}" / "state" / "train_state.pt").is_file()
    assert not (out / "final").exists()
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    run_in_process(tiny_data, out, "--resume", "auto")
    assert losses(out) == losses(straight_run)


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_tensorboard_and_wandb_receive_the_metrics(tiny_data, tmp_path, monkeypatch, logger):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_in_process(tiny_data, out, "--logger", logger, steps=3)
    if logger == "wandb":
        import wandb
        wandb.finish()  # what the end of a script's process does: the offline run's log is complete
    if logger == "tensorboard":
        expected = [float(r["train_loss"]) for r in read_metrics(out)]
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        logged = accumulator.Scalars("train_loss")
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)
        assert {"val_loss", "lr", "tokens_per_sec"} <= set(accumulator.Tags()["scalars"])
    else:
        # wandb keeps an offline run in its own binary log (read back only by its Go core): the metrics are in it as
        # JSON values, each written exactly as metrics.csv holds it
        (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        # wandb's own service process writes the log; on a loaded machine it has been seen a moment behind finish()
        deadline = time.monotonic() + 60
        while b"tokens_per_sec" not in (data := log.read_bytes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert b"train_loss" in data and b"tokens_per_sec" in data
        for row in read_metrics(out):
            assert row["train_loss"].encode() in data, row


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp", "slurm"])
def test_two_processes_match_one(tmp_path, launch):
    """The gradient average: 2 CPU processes (gloo) with micro-batch 4 against 1 process accumulating 2 micro-batches
    of 4, the same global batch. Every sample is the same block, so the batches are equal whatever rank reads what,
    and the losses must agree to float tolerance (a wrong gradient average or accumulation scale would not). That
    the ranks read different samples, which these identical blocks cannot show, is
    test_two_ranks_read_different_samples.
    "slurm" starts the two processes itself with the environment srun gives a 2-node job of one task per node,
    as config_hub/slurm/pretrain.sbatch runs it: Fabric must find world size, ranks and the main node there."""
    from litdata import TokensLoader, optimize
    block = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).int()
    optimize(fn=partial_identity(block), inputs=list(range(64)), output_dir=str(tmp_path / "same" / "train"),
             chunk_bytes="1MB", item_loader=TokensLoader(), num_workers=1, mode="overwrite", start_method="fork")
    (tmp_path / "chunks").mkdir()
    os.symlink(tmp_path / "same" / "train", tmp_path / "chunks" / "train")
    base = pretrain_cmd(tmp_path, tmp_path / "one", steps=4)
    common = ["--data.val_dir", "null", "--tokenizer_dir", "null"]
    run(base + common)
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in base] + common
    if launch == "slurm":
        env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NAME="pretrain", SLURM_NTASKS="2",
                   SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_NODELIST="localhost,localhost",
                   MASTER_PORT=str(free_port()))
        ranks = [subprocess.Popen(two + ["--devices", env["SLURM_NTASKS_PER_NODE"], "--num_nodes", env["SLURM_NNODES"],
                                         "--strategy", "ddp"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=dict(env, SLURM_PROCID=str(r), SLURM_NODEID=str(r), SLURM_LOCALID="0"))
                 for r in range(2)]
        outputs = [r.communicate(timeout=300)[0] for r in ranks]
        assert [r.returncode for r in ranks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
        assert "2 rank(s)" in outputs[0]
    else:
        run(two + ["--devices", "2", "--strategy", launch, "--train.micro_batch_size", "4"])
    one_losses = [float(x) for x in losses(tmp_path / "one")]
    two_losses = [float(x) for x in losses(tmp_path / "two")]
    assert two_losses == pytest.approx(one_losses, abs=1e-5)
    assert one_losses[-1] < one_losses[0]


@pytest.mark.slow
def test_two_ranks_read_different_samples(tmp_path):
    """The half of test_two_processes_match_one that its identical blocks cannot see: under a launched 2-process
    Fabric, pretrain.make_loaders (the loader training iterates) gives each rank its own samples. Blocks i = [i] * 33,
    so a micro-batch names the samples in it; one epoch of the two ranks together is the data once, split in two
    (if litdata did not see the process group, each rank would read all of it)."""
    from litdata import TokensLoader, optimize
    for name, first in (("a", 0), ("b", 1000)):  # "b": the second source of a mixture, ids of its own
        optimize(fn=constant_block, inputs=list(range(first, first + 64)), output_dir=str(tmp_path / name),
                 chunk_bytes="1MB", item_loader=TokensLoader(), num_workers=1, mode="overwrite", start_method="fork")
    single, mixture = zip(*launch_two_ranks(pretrain_loader_ids, tmp_path, str(tmp_path)))
    assert [len(ids) for ids in single] == [32, 32]  # 64 samples: 8 micro-batches of 4 per rank
    assert set(single[0]).isdisjoint(single[1])
    assert sorted(single[0] + single[1]) == list(range(64))
    assert all(mixture) and set(mixture[0]).isdisjoint(mixture[1])
    for ids in mixture:
        assert len(set(ids)) == len(ids) and {i // 1000 for i in ids} == {0, 1}  # both sources, no sample twice


@pytest.mark.parametrize("script", ["pretrain", "distill"])
def test_training_samples_are_drawn_from_the_whole_chunk(tmp_path, script):
    """Blocks i = [i] * 33, in order in one chunk: the first steps' samples come from all over it, not from one run of
    neighbours (litdata's default from 0.2.74 shuffles aligned runs of 256 samples: ids within 256 of each other).
    distill.py's chunks format reads chunks as pretrain.py does."""
    import lightning as L
    from litdata import TokensLoader, optimize

    import distill
    from model import Config
    optimize(fn=constant_block, inputs=list(range(600)), output_dir=str(tmp_path / "a"), chunk_bytes="1MB",
             item_loader=TokensLoader(), num_workers=1, mode="overwrite", start_method="fork")
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=32)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    if script == "pretrain":
        loader, _ = pretrain.make_loaders(fabric, pretrain.DataArgs(train_dirs=[str(tmp_path / "a")], val_dir=None),
                                          config, micro_batch_size=4, seed=1337)
    else:
        data = distill.DataArgs(train_dirs=[str(tmp_path / "a")], val_dir=None)
        train = distill.TrainArgs(global_batch_size=4, micro_batch_size=4)
        train_set, _ = distill.make_datasets(fabric, data, config, None, train)
        loader = distill.make_train_loader(fabric, train_set, data, train, config.block_size)
    ids = block_ids(loader)
    assert sorted(ids) == list(range(600))  # an epoch: every sample once
    first = ids[:32]  # 8 micro-batches
    assert max(first) - min(first) > 300, first


def constant_block(i: int):
    yield torch.full((33,), i, dtype=torch.int32)  # block_size 32 + 1: one sample of make_loaders


def pretrain_loader_ids(root: str, out: str) -> None:
    """One rank of test_two_ranks_read_different_samples, in its own process: a Fabric launched as torchrun's or
    SLURM's ranks are, then the sample ids of one epoch of pretrain.make_loaders' train loader, over one source and
    over a mixture of two, written to `out` as JSON."""
    import lightning as L

    from model import Config
    from pretrain import DataArgs, make_loaders
    from training import make_strategy
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=make_strategy("ddp", 2, 1))
    fabric.launch()
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=32)
    ids = []
    for dirs in ([f"{root}/a"], [f"{root}/a", f"{root}/b"]):
        loader, _ = make_loaders(fabric, DataArgs(train_dirs=dirs, val_dir=None, num_workers=1), config,
                                 micro_batch_size=4, seed=1337)
        ids.append(block_ids(loader))
    Path(out).write_text(json.dumps(ids))


def block_ids(batches) -> list[int]:
    """The id of every sample in micro-batches (B, T) of constant rows (a mixed row would be a misaligned read)."""
    ids = []
    for batch in batches:
        assert (batch == batch[:, :1]).all(), batch
        ids += batch[:, 0].tolist()
    return ids


def launch_two_ranks(function, tmp_path: Path, *args: str) -> list:
    """function(*args, out) of a test module in ranks 0 and 1 of a 2-process job on this machine, in the environment
    torchrun gives (so Fabric starts no processes of its own); the JSON each wrote to `out`, by rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", NODE_RANK="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])  # the test modules
    outs, logs = [tmp_path / f"rank{r}.json" for r in range(2)], [tmp_path / f"rank{r}.log" for r in range(2)]
    call = f"from {function.__module__} import {function.__name__} as f; f"
    ranks = []
    for r, (out, log) in enumerate(zip(outs, logs)):
        with log.open("w") as f:  # the child has its own copy of the descriptor
            ranks.append(subprocess.Popen([sys.executable, "-c", call + repr((*args, str(out)))], cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
    deadline = time.monotonic() + 300
    # until both are done, one failed (the other would wait in a collective) or the time is up
    while any(r.poll() is None for r in ranks) and not any(r.returncode for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    for r in ranks:
        if r.poll() is None:
            r.kill()
            r.wait()
    assert [r.returncode for r in ranks] == [0, 0], "".join(log.read_text()[-2000:] for log in logs)
    return [json.loads(out.read_text()) for out in outs]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class partial_identity:
    def __init__(self, block):
        self.block = block

    def __call__(self, _):
        yield self.block


def test_bad_input_is_one_line(tiny_data, tmp_path):
    """In this process; tests/test_bad_input.py runs pretrain.py's __main__ once to see it print the one line."""
    (tmp_path / "empty").mkdir()
    assert "no input files" in cli_error(["--inputs", str(tmp_path / "empty"), "--tokenizer_dir",
                                          str(tiny_data / "tokenizer"), "--out_dir", str(tmp_path / "out")],
                                         entry=prepare_text.main)
    missing = [a.replace(str(tiny_data / "chunks" / "train"), str(tmp_path / "nowhere"))
               for a in pretrain_args(tiny_data, tmp_path / "o1")]
    assert str(tmp_path / "nowhere") in cli_error(missing)
    (tmp_path / "bad.yaml").write_text("trian:\n  lr: 0.1\n")  # a misspelt section: jsonargparse's ArgumentError
    assert "trian" in cli_error(pretrain_args(tiny_data, tmp_path / "o2", "--config", str(tmp_path / "bad.yaml")))
    too_long = pretrain_args(tiny_data, tmp_path / "o3", "--model.overrides",
                             json.dumps(dict(vocab_size=VOCAB, block_size=100000)))
    assert "block_size" in cli_error(too_long)
    small_vocab = pretrain_args(tiny_data, tmp_path / "o4", "--model.overrides", json.dumps(dict(vocab_size=100)))
    assert "vocab_size" in cli_error(small_vocab)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    # lr 1e30 (no warmup, no clipping): Adam moves every weight by ~1e30 at step 1, so step 2's loss is not finite
    message = cli_error(pretrain_args(tiny_data, tmp_path / "run", "--train.lr", "1e30", "--train.min_lr", "1e30",
                                      "--train.warmup_steps", "0", "--train.grad_clip", "null",
                                      "--checkpoint.interval", "1"))
    assert "loss is" in message and "at step 2" in message
    assert (tmp_path / "run" / "step-00000001" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "step-00000002").exists()


# pretrain's recipes; finetune_*.yaml, distill_*.yaml and align_*.yaml are parsed by their scripts' tests
PRETRAIN_CONFIGS = [p for p in sorted((ROOT / "config_hub").glob("*.yaml"))
                    if not p.name.startswith(("finetune_", "distill_", "align_", "grpo_"))]


@pytest.mark.parametrize("config", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_config_hub_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as e:  # --print_config prints and exits
        CLI(pretrain.setup, args=["--config", str(config), "--print_config"], exit_on_error=False)
    assert not e.value.code
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["name"] == yaml.safe_load(config.read_text())["model"]["name"]


def losses(out: Path) -> list[str]:
    return [r["train_loss"] for r in read_metrics(out)]


def test_prepare_slimpajama_and_starcoder_from_their_raw_formats(tmp_path, tiny_data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from data_prep import prepare_slimpajama, prepare_starcoder
    rows = [dict(text=f"web text {i}", meta=dict(redpajama_set_name="RedPajamaCommonCrawl")) for i in range(5)]
    rows.append(dict(text="def github(): pass", meta=dict(redpajama_set_name="RedPajamaGithub")))
    for raw in ("train/chunk1", "validation/chunk1"):
        (tmp_path / "slim" / raw).mkdir(parents=True)
        lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (tmp_path / "slim" / raw / "example_0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    prepare_slimpajama.main(input_dir=tmp_path / "slim", tokenizer_dir=tiny_data / "tokenizer",
                            out_dir=tmp_path / "slim_out", workers=1)
    assert prepare_text.count(tmp_path / "slim_out" / "train")[0] == 5  # the GitHub row is dropped
    assert prepare_text.count(tmp_path / "slim_out" / "val")[0] == 5

    for lang in ("python", "rust"):
        (tmp_path / "star" / lang).mkdir(parents=True)
        pq.write_table(pa.table({"content": [f"// {lang} file {i}" for i in range(3)], "id": [1, 2, 3]}),
                       tmp_path / "star" / lang / "train-00000-of-00001.parquet")
    prepare_starcoder.main(input_dir=tmp_path / "star", tokenizer_dir=tiny_data / "tokenizer",
                           out_dir=tmp_path / "star_out", workers=1)
    assert prepare_text.count(tmp_path / "star_out")[0] == 6
