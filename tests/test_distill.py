"""distill.py: the divergences against independent references, the chunked and top-K cached losses against the plain
ones, and the script end to end on tiny models, in this process (resume, SIGUSR1, the teacher's top-K logits from
data_prep/teacher_topk.py, SFT + LoRA + on-policy, bad input)."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import CLI
from torch.distributions import Categorical, kl_divergence

from checkpoint import load_lora_model, load_model, save_checkpoint
from conftest import ROOT
import distill
from data_prep import prepare_text, teacher_topk, train_tokenizer
from distill import DIVERGENCES, Distiller, KDArgs, distill_loss, divergence
from model import Config, GPT, InputError
from test_pretrain import block_ids, constant_block, launch_two_ranks
from training import lr_at

VOCAB = 320  # the tiny tokenizer's size: 256 byte symbols, 2 specials and a few merges (as tests/test_pretrain.py)
# Runs in a subprocess, tiny models: one thread each is fastest, and it keeps a shared 2-core machine usable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("tiny-test", **{"vocab_size": VOCAB, **overrides}))


def peaked_teacher(seed: int = 0, **overrides) -> GPT:
    """A random model whose output head is scaled up, so that its next-token distributions are far from uniform
    (a random init's are nearly uniform, which a student matches from the start)."""
    model = tiny(seed, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.eval().requires_grad_(False)


# ---- the loss --------------------------------------------------------------------------------------------------------

def random_logits(seed: int, n: int = 6, V: int = 50, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * scale, torch.randn(n, V, generator=g) * scale  # student, teacher


@pytest.mark.parametrize("kind,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.1), ("jsd", 0.5),
                                       ("jsd", 0.9)])
def test_divergences_match_independent_references(kind, beta):
    s, t = random_logits(0)
    ours = divergence(s, t, kind, beta or 0.5)
    if kind == "forward_kl":  # KL(teacher || student)
        reference = kl_divergence(Categorical(logits=t.double()), Categorical(logits=s.double()))
    elif kind == "reverse_kl":  # KL(student || teacher)
        reference = kl_divergence(Categorical(logits=s.double()), Categorical(logits=t.double()))
    else:  # GKD eq. 1 in float64 from the probabilities themselves: P teacher, Q student, M = beta P + (1 - beta) Q
        P, Q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
        M = beta * P + (1 - beta) * Q
        reference = beta * (P * (P / M).log()).sum(-1) + (1 - beta) * (Q * (Q / M).log()).sum(-1)
    assert ours.dtype == torch.float32 and ours.shape == (6,)
    # float32 log-softmax of logits of size ~10: a few ulps each, summed over 50 terms
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)


def test_jsd_tends_to_the_forward_and_reverse_kl():
    """GKD / TRL's convention: JSD_beta / beta -> KL(teacher || student) as beta -> 0, and JSD_beta / (1 - beta) ->
    KL(student || teacher) as beta -> 1. The next term of the expansion is O(beta) relative (~1.3 beta for these
    logits: the expansion needs beta * P / Q << 1, so mild logits); the wrong convention would swap the two limits."""
    s, t = random_logits(1, scale=0.5)
    forward, reverse = divergence(s, t, "forward_kl"), divergence(s, t, "reverse_kl")
    for eps in (1e-1, 1e-2, 1e-3):
        torch.testing.assert_close(divergence(s, t, "jsd", eps) / eps, forward, rtol=3 * eps, atol=0)
        torch.testing.assert_close(divergence(s, t, "jsd", 1 - eps) / eps, reverse, rtol=3 * eps, atol=0)


def test_loss_weights_and_temperature_squared():
    ce, kd_sum = torch.tensor(3.0), torch.tensor(0.5)
    assert distill_loss(ce, kd_sum, KDArgs(alpha=0.3, temperature=2.0)).item() == pytest.approx(0.3 * 3 + 0.7 * 4 * 0.5)
    assert distill_loss(ce, kd_sum, KDArgs(alpha=0.3, temperature=2.0), on_policy=True).item() == \
        pytest.approx(0.7 * 4 * 0.5)
    # Why T^2 (Hinton et al. 2015, section 2.1): d KL(p_T || q_T) / d s = (q_T - p_T) / T, so T^2 * that gradient
    # tends to ((s - mean s) - (t - mean t)) / V as T grows, independent of T; the next term of the expansion of the
    # softmaxes is O(|logits| / T) relative. Without the T^2 the gradient would vanish as 1 / T^2.
    s, t = random_logits(2, n=1, V=20)
    s.requires_grad_(True)
    limit = ((s - s.mean()) - (t - t.mean())).detach() / 20
    for T in (50.0, 200.0, 1000.0):
        s.grad = None
        kd_sum = divergence(s / T, t / T, "forward_kl").sum()
        distill_loss(torch.tensor(0.0), kd_sum, KDArgs(alpha=0.0, temperature=T)).backward()
        bound = max(s.abs().max().item(), t.abs().max().item()) / T
        assert (s.grad - limit).abs().max() <= bound * limit.abs().max()


def distiller_batch(seed: int = 0, B: int = 3, T: int = 20):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, :5] = labels[2, 12:] = -100  # a masked prompt and padding, as SFT batches have
    return input_ids, labels


def losses_and_grads(distiller: Distiller, **batch) -> tuple[torch.Tensor, dict]:
    distiller.student.zero_grad(set_to_none=True)
    ce, kd_sum = distiller(**batch)
    (ce + kd_sum).backward()
    return torch.stack([ce, kd_sum]).detach(), {n: p.grad.clone() for n, p in distiller.student.named_parameters()}


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_loss_equals_the_unchunked_one(kind):
    teacher, student = peaked_teacher(), tiny(1, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    input_ids, labels = distiller_batch()
    kd = dict(divergence=kind, temperature=2.0)
    whole, whole_grads = losses_and_grads(Distiller(student, teacher, KDArgs(chunk_size=None, **kd), VOCAB),
                                          input_ids=input_ids, labels=labels)
    chunked, chunked_grads = losses_and_grads(Distiller(student, teacher, KDArgs(chunk_size=7, **kd), VOCAB),
                                              input_ids=input_ids, labels=labels)
    # the same float32 terms summed in another grouping (7 positions at a time): rounding only
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)
    # and the sums are what the references give over the unmasked positions
    mask = labels != -100
    s, t = student(input_ids)[mask] / 2.0, teacher(input_ids)[mask] / 2.0
    torch.testing.assert_close(whole[1], divergence(s, t, kind).sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole[0], torch.nn.functional.cross_entropy(student(input_ids)[mask], labels[mask],
                                                                           reduction="sum").detach(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_loss_renormalises_on_the_support_and_equals_the_full_loss_at_k_vocab(kind):
    teacher, student = peaked_teacher(), tiny(1, n_layer=1)
    input_ids, labels = distiller_batch(1)
    kd = KDArgs(divergence=kind, temperature=1.5, chunk_size=16)
    distiller = Distiller(student, teacher, kd, VOCAB)
    full = torch.stack(distiller(input_ids, labels)).detach()
    logits = teacher(input_ids)
    for K in (VOCAB, 10):
        values, indices = logits.topk(K, dim=-1)
        cached = torch.stack(Distiller(student, None, kd, VOCAB)(input_ids, labels, values, indices.int())).detach()
        if K == VOCAB:  # the same distributions, the ids in another order
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        else:  # both softmaxes taken over the teacher's K ids only
            mask = labels != -100
            s = student(input_ids).gather(-1, indices)[mask] / 1.5
            expected = divergence(s, values[mask] / 1.5, kind).sum()
            torch.testing.assert_close(cached[1], expected.detach(), rtol=1e-5, atol=1e-5)
            assert cached[1] < full[1]  # the tail left out (here, for a peaked teacher)
        assert cached[0].item() == pytest.approx(full[0].item(), rel=1e-6)  # the CE never depends on the teacher


# ---- the script ------------------------------------------------------------------------------------------------------

def write_corpus(path: Path, n_files: int = 12, word: str = "function") -> Path:
    path.mkdir(parents=True)
    for i in range(n_files):
        lines = [f"def {word}_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)]
        (path / f"module_{i}.py").write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    """A tokenizer, litdata chunks and SFT records of a tiny corpus; a peaked teacher and a student checkpoint."""
    root = tmp_path_factory.mktemp("distill")
    corpus = write_corpus(root / "corpus")
    train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=VOCAB)
    prepare_text.main(inputs=str(corpus), tokenizer_dir=root / "tokenizer", out_dir=root / "chunks", workers=1,
                      val_fraction=0.2)
    teacher = peaked_teacher(block_size=256)  # 256: room for the Alpaca prompt of the SFT records
    save_checkpoint(root / "teacher", teacher.config, teacher.state_dict(), root / "tokenizer")
    student = tiny(1, block_size=256, n_layer=1)
    save_checkpoint(root / "student", student.config, student.state_dict(), root / "tokenizer")
    records = [{"instruction": f"add {i} and {j}", "output": f"{i + j}"} for i in range(10) for j in range(4)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # a tokenizer trained on other text: the same size, other merges
    other = write_corpus(root / "other_corpus", word="lambda_value")
    train_tokenizer.main(inputs=str(other), out_dir=root / "other_tokenizer", vocab_size=VOCAB)
    save_checkpoint(root / "other_student", student.config, student.state_dict(), root / "other_tokenizer")
    return root


SCRATCH_STUDENT = ("--student_config", "tiny-test", "--student_overrides",
                   json.dumps(dict(vocab_size=VOCAB, block_size=32, n_layer=1)))


def distill_args(root: Path, out_dir: Path, *extra: str, steps: int = 12, student=SCRATCH_STUDENT) -> list[str]:
    return ["--teacher_dir", str(root / "teacher"), *student,
            "--data.train_dirs", json.dumps([str(root / "chunks" / "train")]),
            "--data.val_dir", str(root / "chunks" / "val"), "--out_dir", str(out_dir),
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
            "--train.lr", "1e-2", "--train.min_lr", "1e-3", "--train.warmup_steps", "2",
            "--eval.interval", "4", "--eval.max_batches", "2", "--checkpoint.interval", "4",
            "--checkpoint.keep_last", "5", "--kd.chunk_size", "50", *extra]


def sft_args(root: Path, out_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["--teacher_dir", str(root / "teacher"), "--student_dir",
            str(root / "student"), "--data.format", "sft", "--data.train_files", str(root / "sft.jsonl"),
            "--data.val_split", "0.2", "--out_dir", str(out_dir), "--train.global_batch_size", "8",
            "--train.micro_batch_size", "4", "--train.max_steps", str(steps), "--train.lr", "1e-2",
            "--train.warmup_steps", "2", "--eval.interval", "3", "--eval.max_batches", "2",
            "--checkpoint.interval", "3", "--checkpoint.keep_last", "5", *extra]


@contextmanager
def one_thread():
    """Tiny models: one thread is fastest, and it keeps a shared 2-core machine usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args: list[str]) -> None:
    """distill.py's command line in this process: a new process would spend most of a tiny run importing torch."""
    sigusr1 = signal.getsignal(signal.SIGUSR1)
    try:
        with one_thread():
            CLI(distill.setup, args=args, exit_on_error=False, as_positional=False)
    finally:  # the run's SIGUSR1 handler (training.StopSignal) goes with it
        signal.signal(signal.SIGUSR1, sigusr1)


def run_script(args: list[str]) -> None:
    """distill.py as its own process, for the runs that Fabric launches on several ranks."""
    result = subprocess.run([sys.executable, "distill.py", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def error_of(entry, args: list[str], **kwargs) -> str:
    """The one line a command line stops with: what its __main__ prints after 'error: ' (test_main_prints_one_error_line
    runs that path itself)."""
    with pytest.raises(InputError) as e:
        CLI(entry, args=args, exit_on_error=False, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def distill_error(args: list[str]) -> str:
    return error_of(distill.setup, args, as_positional=False)


def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight_run(setup_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(distill_args(setup_dir, out))
    return out


def test_distill_logs_ce_kd_and_total_and_the_student_learns_the_teacher(straight_run):
    rows = read_metrics(straight_run)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert {"train_loss", "ce_loss", "kd_loss", "val_loss", "val_kd"} <= set(rows[0])
    for r in rows:  # alpha 0.5, T 1: the total is the mean of the two
        assert float(r["train_loss"]) == pytest.approx((float(r["ce_loss"]) + float(r["kd_loss"])) / 2, rel=1e-5)
    assert [int(r["step"]) for r in rows if r["val_kd"]] == [4, 8, 12]
    assert int(rows[-1]["tokens"]) == 12 * 8 * 32  # steps x global batch x block: every token a target
    kd = [float(r["kd_loss"]) for r in rows]
    assert kd[-1] < 0.7 * kd[0], kd  # 12 steps at lr 1e-2 take a third off the divergence to the peaked teacher
    assert sorted(p.name for p in straight_run.glob("step-*")) == [f"step-{s:08d}" for s in (4, 8, 12)]
    model = load_model(straight_run / "final")  # a checkpoint every script reads
    assert model.config.n_layer == 1 and (straight_run / "final" / "tokenizer.json").is_file()


LOSSES = ["train_loss", "ce_loss", "kd_loss", "val_loss", "val_kd"]


def losses(out_dir: Path) -> list[list[str]]:
    return [[r[c] for c in LOSSES] for r in read_metrics(out_dir)]


def test_resume_is_exact(setup_dir, straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    shutil.rmtree(out / "step-00000012")
    shutil.rmtree(out / "final")
    run(distill_args(setup_dir, out, "--resume", "auto"))
    assert "resumed from" in capsys.readouterr().out
    assert losses(out) == losses(straight_run)  # bitwise on CPU


def test_sigusr1_checkpoints_requeues_and_resumes(setup_dir, straight_run, tmp_path, monkeypatch, capsys,
                                                  slurm_job):
    """SLURM's warning before the time limit (SIGUSR1, as config_hub/slurm/pretrain.sbatch asks for), here raised
    during step 6: the run checkpoints after that step, requeues the job through scontrol and returns without a
    final/; --resume auto then finishes it with the uninterrupted run's numbers (as tests/test_pretrain.py's)."""

    def lr_at_and_signal(step, *args):  # lr_at is called at the start of every step
        if step == 6:
            # the default action of SIGUSR1 would end pytest itself: only a handler the run installed may receive it
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None), "no SIGUSR1 handler"
            signal.raise_signal(signal.SIGUSR1)
        return lr_at(step, *args)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(distill, "lr_at", lr_at_and_signal)
        run(distill_args(setup_dir, out))
    assert int(read_metrics(out)[-1]["step"]) == 6
    assert "SIGUSR1: stopped after step 6" in capsys.readouterr().out
    assert (out / "step-00000006" / "state" / "train_state.pt").is_file()
    assert not (out / "final").exists()
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    run(distill_args(setup_dir, out, "--resume", "auto"))
    assert losses(out) == losses(straight_run)
    assert (out / "final" / "model.safetensors").is_file()


def build_topk(setup_dir: Path, out_dir: Path, K: int) -> None:
    """data_prep/teacher_topk.py for distill_args' run: its teacher, train chunks and block_size."""
    with one_thread():
        teacher_topk.main(teacher_dir=setup_dir / "teacher", topk=K, out_dir=out_dir, block_size=32, batch_size=4,
                          chunk_size=50, data=teacher_topk.DataArgs(train_dirs=[str(setup_dir / "chunks" / "train")]))


def test_topk_cache_roundtrip(setup_dir, straight_run, tmp_path, capsys):
    """K = vocab: the offline step stores every logit of the teacher, sorted, and the run that reads it trains exactly
    as with the live teacher (the cache is one chunk file, read in the order of the train chunks here). Then the
    step keeps a cache it built already, and a cache of another K, teacher, vocabulary or data is refused."""
    from litdata import StreamingDataset
    cache_dir = tmp_path / f"teacher-top{VOCAB}"
    build_topk(setup_dir, cache_dir, VOCAB)
    cache = StreamingDataset(str(cache_dir / "train-0"))
    teacher = load_model(setup_dir / "teacher")
    for i in (0, len(cache) - 1):
        item = cache[i]
        assert item["values"].shape == item["indices"].shape == (32, VOCAB) and item["indices"].dtype == torch.int32
        logits = teacher(item["input_ids"][None])[0]
        torch.testing.assert_close(item["values"], logits.gather(-1, item["indices"].long()), rtol=0, atol=1e-5)
        assert torch.equal(item["values"], item["values"].sort(dim=-1, descending=True).values)
        assert torch.equal(item["indices"].sort(dim=-1).values[0], torch.arange(VOCAB, dtype=torch.int32))
    out = tmp_path / "run"
    capsys.readouterr()
    run(distill_args(setup_dir, out, "--teacher_topk_dir", str(cache_dir), steps=2))
    assert "reading the teacher's top-320 logits" in capsys.readouterr().out
    live = read_metrics(straight_run)[:2]
    for cached_row, live_row in zip(read_metrics(out), live, strict=True):
        for c in ("ce_loss", "kd_loss"):  # the same batches; K = vocab permutes the logits only
            assert float(cached_row[c]) == pytest.approx(float(live_row[c]), rel=1e-5)
    assert not read_metrics(out)[-1]["val_kd"]  # no live teacher to validate against

    index = (cache_dir / "train-0" / "index.json").stat().st_mtime_ns
    build_topk(setup_dir, cache_dir, VOCAB)  # built already: kept as it is
    assert "already built" in capsys.readouterr().out
    assert (cache_dir / "train-0" / "index.json").stat().st_mtime_ns == index
    message = error_of(teacher_topk.main, ["--teacher_dir", str(setup_dir / "teacher"), "--topk", "16",
                                           "--out_dir", str(cache_dir), "--block_size", "32", "--data.train_dirs",
                                           json.dumps([str(setup_dir / "chunks" / "train")])])
    assert "another topk" in message and "--out_dir" in message

    # what distill refuses: a cache of another teacher (a copy is another file), vocabulary or data
    shutil.copytree(setup_dir / "teacher", tmp_path / "teacher_copy")
    message = distill_error(distill_args(setup_dir, tmp_path / "o1", "--teacher_topk_dir", str(cache_dir),
                                         "--teacher_dir", str(tmp_path / "teacher_copy")))
    assert f"{cache_dir / 'train-0'}: a teacher cache built for another teacher" in message
    message = distill_error(distill_args(setup_dir, tmp_path / "o2", "--teacher_topk_dir", str(cache_dir),
                                         "--data.train_dirs", json.dumps([str(setup_dir / "chunks" / "val")])))
    assert "another source" in message
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(cache_dir, other_vocab)
    meta = json.loads((other_vocab / "train-0" / "meta.json").read_text())
    (other_vocab / "train-0" / "meta.json").write_text(json.dumps({**meta, "vocab": VOCAB - 20}))
    message = distill_error(distill_args(setup_dir, tmp_path / "o3", "--teacher_topk_dir", str(other_vocab)))
    assert "another vocab (300, this run: 320)" in message
    # corrupt files of the cache: one line naming them
    (other_vocab / "train-0" / "meta.json").write_text('{"teacher": ')
    message = distill_error(distill_args(setup_dir, tmp_path / "o4", "--teacher_topk_dir", str(other_vocab)))
    assert "train-0/meta.json" in message and "invalid JSON" in message
    (other_vocab / "train-0" / "meta.json").write_text(json.dumps(meta))
    (other_vocab / "train-0" / "index.json").write_text('{"chunks": [')
    message = distill_error(distill_args(setup_dir, tmp_path / "o5", "--teacher_topk_dir", str(other_vocab)))
    assert "train-0/index.json" in message and "invalid JSON" in message
    assert "data_prep.teacher_topk" in distill_error(distill_args(setup_dir, tmp_path / "o6", "--teacher_topk_dir",
                                                           str(tmp_path / "nowhere")))


def test_sft_lora_student_on_policy_with_a_quantised_teacher_resumes_exactly(setup_dir, tmp_path):
    """The other paths together: SFT records (prompt masked), a LoRA student on a checkpoint, GKD's on-policy
    batches (the student's samples scored by the teacher), JSD, an NF4 teacher; killed at step 3 and resumed."""
    extra = ("--lora.r", "4", "--on_policy_fraction", "0.5", "--on_policy.max_new_tokens", "6",
             "--kd.divergence", "jsd", "--kd.temperature", "2", "--teacher_quantize", "bnb.nf4")
    out = tmp_path / "run"
    run(sft_args(setup_dir, out, *extra))
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert sum(int(r["on_policy"]) for r in rows) > 0 and all(math.isfinite(float(r["kd_loss"])) for r in rows)
    assert any(int(r["on_policy"]) == 2 and not r["ce_loss"] for r in rows)  # all on-policy: no CE to report
    assert (out / "final" / "lora.safetensors").is_file()
    model, base = load_lora_model(out / "final")
    assert base == setup_dir / "student"
    assert yaml.safe_load((out / "final" / "lora_config.yaml").read_text())["r"] == 4

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "step-00000006")
    shutil.rmtree(resumed / "final")
    run(sft_args(setup_dir, resumed, *extra, "--resume", "auto"))
    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]  # noqa: E731
    assert without_speed(read_metrics(resumed)) == without_speed(rows)  # the same samples, the same floats


def test_bad_input_is_one_line(setup_dir, tmp_path):
    message = distill_error(distill_args(setup_dir, tmp_path / "o1", student=("--student_dir",
                                                                             str(setup_dir / "other_student"))))
    assert "tokenizer" in message and "differ" in message
    assert "model_config.yaml" in distill_error(distill_args(setup_dir, tmp_path / "o2", "--teacher_dir",
                                                             str(tmp_path / "nowhere")))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow  # a process start (~10 s on 2 cores); the in-process errors above cover the messages
def test_main_prints_one_error_line(setup_dir, tmp_path):
    """The __main__ path of data_prep/teacher_topk.py, run as `python -m data_prep.teacher_topk`: exit
    code 1, no traceback, one 'error:' line naming the flag. distill.py's is tests/test_bad_input.py's."""
    result = subprocess.run([sys.executable, "-m", "data_prep.teacher_topk", "--teacher_dir", str(setup_dir / "teacher"),
                             "--topk", str(VOCAB + 1), "--out_dir", str(tmp_path / "cache")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --topk {VOCAB + 1}: expected from 1 to the "
                                                             f"compared vocabulary of {VOCAB} ids"), result.stderr
    assert not (tmp_path / "cache").exists()


def test_bad_arguments_are_checkpoint_errors(setup_dir):
    """What setup() rejects before any work; the script prints a InputError as the one line shown above."""
    from distill import check_kd_args, check_vocabularies
    from tokenizer import Tokenizer
    teacher = load_model(setup_dir / "teacher").config
    with pytest.raises(InputError, match="vocab_size 256 is smaller than the tokenizer's 320"):
        check_vocabularies(setup_dir / "teacher", Tokenizer(setup_dir / "teacher"), None, teacher,
                           Config.from_name("tiny-test"))
    # a student that pads its vocabulary further compares the ids both have
    assert check_vocabularies(setup_dir / "teacher", Tokenizer(setup_dir / "teacher"), setup_dir / "student", teacher,
                              Config.from_name("tiny-test", vocab_size=384)) == VOCAB
    ok = dict(on_policy_fraction=0.0, teacher_topk_dir=None, teacher_quantize=None, strategy="auto", lora=None,
              student_dir=None)
    for kd, changes, match in [(KDArgs(divergence="jsd", beta=0.0), {}, "--kd.beta"),
                               (KDArgs(divergence="kl"), {}, "--kd.divergence"),
                               (KDArgs(alpha=1.5), {}, "--kd.alpha"),
                               (KDArgs(), dict(lora=object()), "--student_dir"),
                               (KDArgs(), dict(on_policy_fraction=0.5, teacher_topk_dir="cache"), "live teacher"),
                               (KDArgs(), dict(teacher_quantize="bnb.nf4", teacher_topk_dir="cache"),
                                "--teacher_quantize with --teacher_topk_dir"),
                               (KDArgs(alpha=1.0), dict(on_policy_fraction=0.5), "KD term")]:
        with pytest.raises(InputError, match=match):
            check_kd_args(kd, **{**ok, **changes})


@pytest.mark.parametrize("config", sorted((ROOT / "config_hub").glob("distill_*.yaml")), ids=lambda p: p.name)
def test_config_hub_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as e:  # --print_config prints the parsed config and exits
        CLI(distill.setup, args=["--config", str(config), "--print_config"], exit_on_error=False, as_positional=False)
    assert e.value.code in (None, 0)
    assert yaml.safe_load(capsys.readouterr().out)["teacher_dir"] == yaml.safe_load(config.read_text())["teacher_dir"]


@pytest.mark.slow
def test_two_fsdp_processes_match_one(tmp_path, setup_dir):
    """The gradient average: 2 CPU processes (gloo, FSDP2 over both models) with a micro-batch of 4 against 1 process
    accumulating 2 micro-batches of 4. Every sample is the same block, so the batches are equal whatever rank reads
    what, and the losses must agree to float tolerance (a wrong gradient average, accumulation scale or token count
    would not). That the ranks read different samples, which these identical blocks cannot show, is
    test_two_ranks_read_different_samples."""
    from litdata import TokensLoader, optimize
    block = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).int()
    optimize(fn=SameBlock(block), inputs=list(range(64)), output_dir=str(tmp_path / "same" / "chunks" / "train"),
             chunk_bytes="1MB", item_loader=TokensLoader(), num_workers=1, mode="overwrite", start_method="fork")
    os.symlink(setup_dir / "teacher", tmp_path / "same" / "teacher")
    run_script(distill_args(tmp_path / "same", tmp_path / "one", "--data.val_dir", "null", steps=4))
    run_script(distill_args(tmp_path / "same", tmp_path / "two", "--data.val_dir", "null", "--devices", "2",
                            "--strategy", "fsdp", steps=4))
    for column in ("ce_loss", "kd_loss"):
        ones = [float(r[column]) for r in read_metrics(tmp_path / "one")]
        assert [float(r[column]) for r in read_metrics(tmp_path / "two")] == pytest.approx(ones, abs=1e-5)


@pytest.mark.slow
def test_two_ranks_read_different_samples(tmp_path):
    """The half of test_two_fsdp_processes_match_one that its identical blocks cannot see: under a launched 2-process
    Fabric (FSDP, as there), distill.py's train loaders give each rank its own samples: litdata chunks
    (make_datasets, make_train_loader), the teacher's top-K logits (written by data_prep/teacher_topk.py in one
    process, read through open_teacher_topk and make_cached_loader) and SFT examples (StepSampler). Sample i is
    [i] * T, so a micro-batch names its samples; one epoch of the two ranks together is the data once, split in two."""
    from litdata import TokensLoader, optimize
    optimize(fn=constant_block, inputs=list(range(64)), output_dir=str(tmp_path / "train"), chunk_bytes="1MB",
             item_loader=TokensLoader(), num_workers=1, mode="overwrite", start_method="fork")
    teacher = tiny()
    save_checkpoint(tmp_path / "teacher", teacher.config, teacher.state_dict())
    teacher_topk.main(teacher_dir=tmp_path / "teacher", topk=4, out_dir=tmp_path / "cache", block_size=32,
                      vocab_size=VOCAB, data=teacher_topk.DataArgs(train_dirs=[str(tmp_path / "train")]))
    ranks = launch_two_ranks(distill_loader_ids, tmp_path, str(tmp_path))
    for source in ("chunks", "cached", "sft"):
        ids = [rank[source] for rank in ranks]
        assert [len(i) for i in ids] == [32, 32], source  # 64 samples: 8 micro-batches of 4 per rank
        assert set(ids[0]).isdisjoint(ids[1]), source
        assert sorted(ids[0] + ids[1]) == list(range(64)), source


def distill_loader_ids(root: str, out: str) -> None:
    """One rank of test_two_ranks_read_different_samples, in its own process: the sample ids of one epoch of each of
    distill.py's train loaders, written to `out` as JSON."""
    import itertools

    import lightning as L

    from distill import (DataArgs, TrainArgs, make_cached_loader, make_datasets, make_train_loader, open_teacher_topk,
                         shard_distiller)
    from training import make_strategy
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=make_strategy("fsdp", 2, 1, shard=shard_distiller))
    fabric.launch()
    root = Path(root)
    config = Config.from_name("tiny-test", vocab_size=VOCAB, block_size=32)
    data = DataArgs(train_dirs=[str(root / "train")], val_dir=None, num_workers=1)
    train = TrainArgs(global_batch_size=8, micro_batch_size=4)
    train_set, _ = make_datasets(fabric, data, config, None, train)  # chunks: no tokenizer needed
    ids = dict(chunks=block_ids(make_train_loader(fabric, train_set, data, train, config.block_size)))
    cache_dirs, K = open_teacher_topk(root / "cache", root / "teacher", data, config, VOCAB, train.seed)
    assert K == 4
    cached = make_cached_loader(fabric, cache_dirs, data, train.micro_batch_size, train.seed)
    ids["cached"] = block_ids(batch["input_ids"] for batch in cached)
    sft = make_train_loader(fabric, NumberedExamples(64), DataArgs(format="sft"), train, config.block_size)
    steps = itertools.islice(sft, 64 // 8)  # an epoch of 8 steps, each a list of micro-batches
    ids["sft"] = block_ids(batch["input_ids"] for step in steps for batch in step)
    Path(out).write_text(json.dumps(ids))


class NumberedExamples:
    """SFT examples as sft_data.load_sft_data gives them, example i being [i] * 5."""
    pad_id = 0

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.full((5,), i), "labels": torch.full((5,), i)}


class SameBlock:
    def __init__(self, block):
        self.block = block

    def __call__(self, _):
        yield self.block
