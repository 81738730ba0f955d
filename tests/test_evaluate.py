"""evaluate.py: perplexity equals exp(mean token loss) computed independently, on text files (as the tokenizer
encodes them) and on the litdata chunks data_prep makes of them (bos ... eos), with and without strided windows, and
on the real SmolLM2 equals transformers' loss; scores come through the chunked head and equal the full logits';
lm-eval tasks through our LM class give what lm-eval's own HF backend gives on the same weights; a run's checkpoints
as a table; bad input in one line."""

import json
import math
import os
import shutil
import subprocess
import sys

# lm-eval and datasets read these at import: local JSON tasks only, never the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import CLI

import evaluate
from generation import generate
from checkpoint import load_model, save_checkpoint
from conftest import ROOT
from data_prep import prepare_text, train_tokenizer
from model import GPT, Config, InputError
from tokenizer import Tokenizer

BLOCK_SIZE = 64  # of the tiny model; the long document below is several blocks long
SHORT_DOCS = {"a.txt": "def f(x):\n    return x * 2\n", "b.txt": "The quick brown fox jumps over the lazy dog.",
              "c.txt": "x = [i * i for i in range(10)]\nprint(sum(x))\n", "d.jsonl": None}
JSONL_DOCS = ["first line document", "second: def g(y): return y + 1"]
LONG_DOC = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}  # the {i}th function\n" for i in range(12))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and on a busy machine far faster: two OpenMP threads spin-waiting for
    a shared core made a 64-token forward take 250 ms instead of 2 ms on a 2-core box running other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def corpus_text() -> str:
    code = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for i in range(15) for j in range(15))
    prose = " ".join(["The quick brown fox jumps over the lazy dog.", "What color is the sky? The sky is blue.",
                      "Grass is green and snow is white.", "Two plus two is four. Three plus three is six."] * 40)
    return code + prose


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained toy tokenizer, three random checkpoints sharing it (a run: step-1, step-2, final) and a corpus."""
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(corpus_text())
    train_tokenizer.main(inputs=str(root / "corpus.txt"), out_dir=root / "tokenizer", vocab_size=320)
    corpus = root / "docs"
    corpus.mkdir()
    for name, text in SHORT_DOCS.items():
        (corpus / name).write_text(text if text else "".join(json.dumps({"text": t}) + "\n" for t in JSONL_DOCS))
    (root / "long.txt").write_text(LONG_DOC)
    config = Config.from_name("tiny-test", vocab_size=320, block_size=BLOCK_SIZE)
    run = root / "run"
    for seed, name in enumerate(["step-00000001", "step-00000002", "final"]):
        torch.manual_seed(seed)
        model = GPT(config)
        with torch.no_grad():  # larger than the init's weights: the losses then differ clearly from log(vocab_size)
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        save_checkpoint(run / name, config, model.state_dict(), tokenizer_dir=root / "tokenizer")
    return dict(root=root, corpus=corpus, long=root / "long.txt", run=run, ckpt=run / "final")


def documents(tok: Tokenizer, corpus, **delimit) -> list[list[int]]:
    """The corpus' documents as the tokenizer encodes them (the toy tokenizer adds a bos), or with bos=True, eos=True
    as data_prep/prepare_text.py writes them into chunks."""
    texts = [(corpus / n).read_text() for n in SHORT_DOCS if SHORT_DOCS[n]] + JSONL_DOCS
    return [tok.encode(t, **delimit) for t in texts]


def full_forward_loss(model, docs: list[list[int]]) -> tuple[float, int]:
    """Mean NLL of every token but the first of each document, each document in one plain forward pass."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            assert len(ids) <= BLOCK_SIZE
            logits = model(torch.tensor([ids]))[0]
            total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return total / count, count


def run_main(**kwargs) -> dict:
    out = kwargs["out"]
    evaluate.main(**kwargs)
    return json.loads(out.read_text())


def test_text_files_perplexity_is_exp_of_the_full_forward_loss(tiny, tmp_path, capsys):
    result = run_main(checkpoint_dir=tiny["ckpt"], data=[tiny["corpus"]], out=tmp_path / "r.json")
    loss, count = full_forward_loss(load_model(tiny["ckpt"]).eval(), documents(Tokenizer(tiny["ckpt"]), tiny["corpus"]))
    assert result["tokens"] == count and result["documents"] == len(SHORT_DOCS) - 1 + len(JSONL_DOCS)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert json.loads(capsys.readouterr().out) == result  # stdout carries the same JSON
    # bfloat16 weights and activations: the same scores up to bfloat16's ~3 significant digits
    bf16 = run_main(checkpoint_dir=tiny["ckpt"], data=[tiny["corpus"]], precision="bf16-true", out=tmp_path / "b.json")
    assert bf16["tokens"] == count and bf16["loss"] == pytest.approx(loss, rel=2e-2)


@pytest.mark.parametrize("max_seq_length,stride", [(None, None), (40, 15), (BLOCK_SIZE, BLOCK_SIZE), (24, 1)])
def test_strided_perplexity_of_a_long_document(tiny, tmp_path, max_seq_length, stride):
    """Independent reference: one forward per token, over the context the sliding window gives it. Windows of
    M tokens end at M, M + S, M + 2S, ... (the last at the document's end); a token is scored by the first window
    that reaches it, which reads the M tokens before that window's end."""
    result = run_main(checkpoint_dir=tiny["ckpt"], data=tiny["long"], max_seq_length=max_seq_length, stride=stride,
                      batch_size=3, out=tmp_path / "r.json")
    M = max_seq_length or BLOCK_SIZE
    S = stride or M // 2
    model = load_model(tiny["ckpt"]).eval()
    ids = Tokenizer(tiny["ckpt"]).encode(LONG_DOC)
    n = len(ids)
    assert n > 3 * BLOCK_SIZE
    nll = 0.0
    with torch.no_grad():
        for t in range(1, n):
            end = M if t <= M else min(M + S * math.ceil((t - M) / S), n - 1)
            start = max(0, end - M)
            logits = model(torch.tensor([ids[start:t]]))[0, -1]
            nll -= torch.log_softmax(logits, dim=-1)[ids[t]].item()
    assert (result["max_seq_length"], result["stride"], result["tokens"]) == (M, S, n - 1)
    assert result["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (n - 1)), rel=1e-5)


def test_litdata_chunks_give_what_their_text_files_give(tiny, tmp_path):
    chunks = tmp_path / "chunks"
    prepare_text.main(inputs=[str(tiny["corpus"]), str(tiny["long"])], tokenizer_dir=tiny["root"] / "tokenizer",
                      out_dir=chunks, val_fraction=0.0, workers=2, chunk_bytes="1KB")
    assert len(json.loads((chunks / "train" / "index.json").read_text())["chunks"]) > 1
    # the stream read in blocks and chunk ends equals the one read token by token; cut, it gives the documents
    tok = Tokenizer(tiny["ckpt"])
    stream = evaluate.read_chunks(chunks / "train", block=7)
    assert torch.equal(stream, evaluate.read_chunks(chunks / "train", block=10**6))
    expected = documents(tok, tiny["corpus"], bos=True, eos=True) + [tok.encode(LONG_DOC, bos=True, eos=True)]
    assert sorted(d.tolist() for d in evaluate.split_documents(stream, tok.bos_id, tok.eos_id)) == sorted(expected)

    # chunk documents keep their bos ... eos: the scores of those token lists, each text's eos included
    from_chunks = run_main(checkpoint_dir=tiny["ckpt"], data=chunks / "train", stride=20, out=tmp_path / "c.json")
    delimited = evaluate.perplexity(load_model(tiny["ckpt"]).eval(), [torch.tensor(d) for d in expected],
                                    BLOCK_SIZE, 20, batch_size=8)
    assert (from_chunks["tokens"], from_chunks["documents"]) == (delimited["tokens"], len(expected))
    assert from_chunks["loss"] == pytest.approx(delimited["loss"], rel=1e-9)
    # the same texts as files: as the tokenizer encodes them, bos but no eos, so one token fewer each
    from_text = run_main(checkpoint_dir=tiny["ckpt"], data=[tiny["corpus"], tiny["long"]], stride=20,
                         out=tmp_path / "t.json")
    assert from_text["documents"] == from_chunks["documents"]
    assert from_text["tokens"] == from_chunks["tokens"] - from_chunks["documents"]


def head_rows(model, monkeypatch) -> list[int]:
    """A spy on model.head: the number of positions each call gives it."""
    seen, head = [], model.head
    monkeypatch.setattr(model, "head", lambda x: seen.append(x.shape[:-1].numel()) or head(x))
    return seen


def full_logits_perplexity(model, docs: list[torch.Tensor], max_seq_length: int, stride: int) -> tuple[float, int]:
    """What evaluate.perplexity computed before it scored through the chunked head: each window's full
    (T, vocab_size) logits, the cross entropy of its last n."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            for start, end, n in evaluate.strided_windows(len(doc), max_seq_length, stride):
                logits = model(doc[None, start:end])[0]  # (T, vocab_size)
                nll += F.cross_entropy(logits[-n:], doc[end + 1 - n:end + 1], reduction="sum").item()
                count += n
    return nll / count, count


@pytest.mark.parametrize("max_seq_length,stride", [(BLOCK_SIZE, 32), (40, 15), (24, 1)])
def test_perplexity_scores_through_the_chunked_head(tiny, monkeypatch, max_seq_length, stride):
    """Only the scored positions reach the head, at most a chunk at a time (model.token_logprobs' 256 rows, as
    evaluate.HEAD_ROWS), never a batch's whole (B, T, vocab_size) logits: in float64 the scores equal the full
    logits' to rounding, over several windows per document and batches of mixed lengths."""
    model = load_model(tiny["ckpt"], dtype=torch.float64).eval()
    tok = Tokenizer(tiny["ckpt"])
    docs = [torch.tensor(d) for d in documents(tok, tiny["corpus"]) + [tok.encode(LONG_DOC)]]
    loss, count = full_logits_perplexity(model, docs, max_seq_length, stride)
    seen = head_rows(model, monkeypatch)
    result = evaluate.perplexity(model, docs, max_seq_length, stride, batch_size=8)
    assert result["tokens"] == count and result["loss"] == pytest.approx(loss, rel=1e-12)
    assert sum(seen) == count and max(seen) <= evaluate.HEAD_ROWS
    assert result["windows"] > len(docs)  # the long document takes several windows


def run_cli(*args, check=True):
    result = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_thread
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_runs_checkpoints_make_a_table(tiny, tmp_path):
    docs = documents(Tokenizer(tiny["ckpt"]), tiny["corpus"])
    expected = {str(tiny["run"] / name): full_forward_loss(load_model(tiny["run"] / name).eval(), docs)[0]
                for name in ["step-00000001", "step-00000002", "final"]}
    result = run_cli("--checkpoint_dir", tiny["run"], "--data", tiny["corpus"], "--out", tmp_path / "run.json")
    rows = result.stdout.splitlines()
    assert rows[0].split() == ["checkpoint", "loss", "perplexity", "tokens"]
    assert [r.split()[0] for r in rows[2:]] == list(expected)  # training order, final last
    written = json.loads((tmp_path / "run.json").read_text())
    assert {k: v["loss"] for k, v in written.items()} == pytest.approx(expected, rel=1e-6)
    assert len(set(expected.values())) == 3
    # as a shell glob expands `run/step-*`: several values after one flag
    steps = [tiny["run"] / "step-00000001", tiny["run"] / "step-00000002"]
    rows = run_cli("--checkpoint_dir", *steps, "--data", *sorted(tiny["corpus"].iterdir())).stdout.splitlines()
    assert [r.split()[0] for r in rows[2:]] == list(map(str, steps))


@pytest.mark.parametrize("args,message", [
    (["--checkpoint_dir", "/nonexistent", "--data", "x"], "/nonexistent/model_config.yaml: not found"),
    (["--data", "/nonexistent.txt"], "--data /nonexistent.txt: no such file or directory"),
    (["--data", "{corpus}", "--stride", 100], "--stride 100: expected 1 to max_seq_length (64)"),
    (["--data", "{corpus}", "--max_seq_length", 65], "--max_seq_length 65: expected 2 to block_size (64)"),
    (["--data", "{corpus}", "--precision", "bf16-mixed"], "--precision 'bf16-mixed': expected one of"),
    ([], "give --data (perplexity) or --tasks (lm-eval), one of the two"),
    (["--tasks", "toy", "--include_path", "/nonexistent"], "--include_path /nonexistent: not a directory"),
])
def test_bad_input_is_one_line(tiny, args, message):
    args = [str(a).format(corpus=tiny["corpus"]) for a in args]
    if "--checkpoint_dir" not in args:
        args = ["--checkpoint_dir", tiny["ckpt"], *args]
    assert message in cli_error(*args)


def cli_error(*args) -> str:
    """The error evaluate.py's command line stops with, run in this process: what its __main__ prints after 'error: '
    (tests/test_bad_input.py runs one real __main__)."""
    with pytest.raises(InputError) as e:
        CLI(evaluate.main, args=evaluate.gather_nargs([str(a) for a in args]), exit_on_error=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_checkpoint_without_weights_or_a_run_without_checkpoints_is_one_line(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["ckpt"], broken)
    (broken / "model.safetensors").unlink()
    (tmp_path / "empty_run").mkdir()
    for ckpt, message in [(broken, "broken/model.safetensors: not found"),
                          (tmp_path / "empty_run", "empty_run: neither a checkpoint")]:
        assert message in cli_error("--checkpoint_dir", ckpt, "--data", tiny["corpus"])


MC_DOCS = [("What color is the sky?", ["blue", "green", "red"], 0), ("Two plus two is", ["four", "six", "five"], 0),
           ("Grass is", ["white", "green"], 1), ("Snow is", ["blue", "white", "green", "red"], 1),
           ("Three plus three is", ["four", "six"], 1), ("The quick brown fox jumps over the", ["lazy dog", "sky"], 0)]
GEN_DOCS = [("What color is the sky?", "blue"), ("Two plus two is", "four"), ("def function_3_4(x):", "return"),
            ("Grass is", "green"), ("x", "y"), ("The quick brown fox jumps over the lazy dog. " * 3, "The")]
ROLLING_DOCS = ["The quick brown fox jumps over the lazy dog.", "def function_1_2(x):\n    return x * 2 + 1\n",
                LONG_DOC, "Snow is white. " * 12]
UNTIL = ["\n", "o", "er"]  # toy_gen's stop strings: the random model writes no newlines, but these letters often
TASKS = {  # three lm-eval task YAMLs over local JSONL files: one per request type
    "toy_mc": """output_type: multiple_choice
num_fewshot: 2
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "toy_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]""",
    "toy_gen": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n", "o", "er"], max_gen_toks: 12, do_sample: false}
metric_list: [{metric: exact_match}]""",
}


@pytest.fixture(scope="module")
def hf_pair(tiny):
    """A tiny random transformers Llama with the toy tokenizer (vocab_size matching it), the same converted to our
    checkpoint directory, and a directory of the three task YAMLs."""
    import transformers

    from convert import from_hf
    from tiny_hf import COMMON

    root = tiny["root"] / "hf_pair"
    tok = Tokenizer(tiny["root"] / "tokenizer")
    config = transformers.LlamaConfig(**dict(COMMON, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                             eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, num_key_value_heads=2))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # as tests/tiny_hf.py: every tensor random, norm scales around 1
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 and "norm" in name else torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["root"] / "tokenizer" / name, root / "hf" / name)
    ours = from_hf.convert(root / "hf", out_dir=root / "ours")

    tasks = root / "tasks"
    tasks.mkdir()
    rows = {"toy_mc": [dict(question=q, choices=c, label=label) for q, c, label in MC_DOCS],
            "toy_rolling": [dict(text=t) for t in ROLLING_DOCS],
            "toy_gen": [dict(question=q, answer=a) for q, a in GEN_DOCS]}
    for name, body in TASKS.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: "
                                            f"{{train: {tasks / name}.jsonl}}}}\ntest_split: train\n{body}\n")
    return dict(hf=root / "hf", ours=ours, tasks=tasks)


def lm_eval_run(model, hf_pair, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), log_samples=True, device="cpu",
                                   task_manager=TaskManager(include_path=str(hf_pair["tasks"]), include_defaults=False),
                                   **kwargs)


@pytest.fixture(scope="module")
def hf_reference(hf_pair):
    """lm-eval's own transformers backend on the HF directory, one request at a time."""
    return lm_eval_run("hf", hf_pair, model_args=f"pretrained={hf_pair['hf']},dtype=float32", batch_size=1)


def metrics(results: dict) -> dict:
    return {(task, k): v for task, values in results["results"].items() for k, v in values.items()
            if isinstance(v, float)}


def test_our_lm_class_scores_as_lm_evals_hf_backend(hf_pair, hf_reference):
    model = load_model(hf_pair["ours"]).eval()
    assert model.config.block_size == 128  # = max_position_embeddings, HFLM's max_length: the same windows
    lm = evaluate.make_lm(model, Tokenizer(hf_pair["ours"]), batch_size=4, max_length=model.config.block_size)
    ours = lm_eval_run(lm, hf_pair)
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        theirs = sorted(hf_reference["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in mine] == [s["arguments"] for s in theirs]
        if task == "toy_gen":  # greedy text, cut at the first stop string
            assert [s["resps"] for s in mine] == [s["resps"] for s in theirs]
            continue
        for a, b in zip(mine, theirs):
            ours_ll, theirs_ll = [x for r in a["resps"] for x in r], [x for r in b["resps"] for x in r]
            if task == "toy_mc":  # (loglikelihood, is_greedy) of each choice
                assert [g for _, g in ours_ll] == [g for _, g in theirs_ll]
                ours_ll, theirs_ll = [x for x, _ in ours_ll], [x for x, _ in theirs_ll]
            assert ours_ll == pytest.approx(theirs_ll, rel=1e-4)
    assert metrics(ours) == pytest.approx(metrics(hf_reference), rel=1e-4)

    # The cases are there: a rolling document spans several windows; some generations end at a stop string, some
    # run out of max_gen_toks (the free greedy continuations, uncut, tell which).
    tok = Tokenizer(hf_pair["ours"])
    assert len(tok.encode(LONG_DOC)) > 128
    # the toy tokenizer adds a bos: the rolling scores (ours as the HF backend's) include log p(bos | bos)
    assert tok.encode(ROLLING_DOCS[0])[0] == tok.bos_id == lm.prefix_token_id
    free = [tok.decode(generate(model, [tok.encode(s["arguments"][0][0])], 12, temperature=0)[0])
            for s in ours["samples"]["toy_gen"]]
    stopped = [any(u in text for u in UNTIL) for text in free]
    assert any(stopped) and not all(stopped), free


def test_cli_tasks_write_lm_evals_results(hf_pair, hf_reference, tmp_path, capsys):
    evaluate.main(checkpoint_dir=hf_pair["ours"], tasks="toy_mc,toy_rolling,toy_gen", include_path=hf_pair["tasks"],
                  batch_size=3, out=tmp_path / "results.json")
    written = json.loads((tmp_path / "results.json").read_text())
    assert metrics(written) == pytest.approx(metrics(hf_reference), rel=1e-4)
    assert written["config"]["checkpoint_dir"] == str(hf_pair["ours"])
    table = capsys.readouterr().out
    assert all(task in table for task in TASKS) and "acc_norm" in table


@pytest.mark.slow  # lm-eval indexes its ~15k built-in task configs before a name can be called unknown (~15 s)
def test_unknown_task_is_one_line(hf_pair):
    result = run_cli("--checkpoint_dir", hf_pair["ours"], "--tasks", "toy_mc,no_such_task", "--include_path",
                     hf_pair["tasks"], check=False)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "unknown task 'no_such_task'" in result.stderr, result.stderr


def full_logits_loglikelihood(model, context: list[int], continuation: list[int], max_length: int):
    """What GPTLM._loglikelihood_tokens computed before it scored through the chunked head: one request's full
    logits, left-truncated as HFLM does."""
    inp = (context + continuation)[-(max_length + 1):-1]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([inp]))[0, len(inp) - len(continuation):], dim=-1)
    target = torch.tensor(continuation)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(dim=-1) == target).all())


def test_loglikelihood_tokens_score_only_the_continuations_through_the_head(tiny, monkeypatch):
    """The trunk once per batch, then only the continuations' positions through the head, evaluate.HEAD_ROWS at a
    time (5 here, so chunks split continuations and cross from one request to the next): in float64 the
    log-likelihoods and is_greedy equal the full logits' ones, for continuations that are the model's greedy
    choice and ones that are not, and for a context longer than max_length."""
    model = load_model(tiny["ckpt"], dtype=torch.float64).eval()
    tok = Tokenizer(tiny["ckpt"])
    requests = []
    for text in [q for q, _ in GEN_DOCS] + [LONG_DOC]:
        context = tok.encode(text)
        # greedy from the context the request's input keeps (its last max_length + 1 - 6 tokens), so is_greedy holds
        greedy = generate(model, [context[-(BLOCK_SIZE + 1 - 6):]], 6, temperature=0)[0]
        for continuation in [greedy, tok.encode(" blue", bos=False, eos=False),
                             tok.encode(" jumps over the lazy dog", bos=False, eos=False)]:
            requests.append(((text, None), context, continuation))
    assert len(requests[-1][1]) > BLOCK_SIZE
    expected = [full_logits_loglikelihood(model, c, x, BLOCK_SIZE) for _, c, x in requests]
    assert any(g for _, g in expected) and not all(g for _, g in expected)

    lm = evaluate.make_lm(model, tok, batch_size=4, max_length=BLOCK_SIZE)
    monkeypatch.setattr(evaluate, "HEAD_ROWS", 5)
    seen = head_rows(model, monkeypatch)
    results = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in results] == [g for _, g in expected]
    assert [ll for ll, _ in results] == pytest.approx([ll for ll, _ in expected], rel=1e-12)
    assert sum(seen) == sum(len(x) for *_, x in requests) and max(seen) == 5


def test_tok_encode_as_the_hf_backend_when_the_tokenizer_names_no_bos(hf_pair, tmp_path):
    """lm-eval's prefix token is then eos, and HFLM.tok_encode encodes a text that starts with eos's text without
    the tokenizer's special tokens (here the post-processor still adds <|bos|>, a token no longer named bos)."""
    from lm_eval.models.huggingface import HFLM

    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    shutil.copytree(hf_pair["hf"], hf_dir)
    shutil.copytree(hf_pair["ours"], ours_dir)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    del config["bos_token"]
    for d in (hf_dir, ours_dir):
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)
    tok = Tokenizer(ours_dir)
    ours = evaluate.make_lm(load_model(ours_dir).eval(), tok, batch_size=1, max_length=128)
    assert tok.bos_id is None and ours.prefix_token_id == theirs.prefix_token_id == tok.eos_id
    texts = ["Snow is white.", "<|eos|>Snow is white.", "<|bos|>Snow is white.", ""]
    assert [ours.tok_encode(t) for t in texts] == [theirs.tok_encode(t) for t in texts]
    assert ours.tok_encode(texts[1]) != tok.encode(texts[1])  # the case: not the tokenizer's own encoding


REAL_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.\n\n"
             "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")


@pytest.mark.real_model
def test_smollm2_text_scores_follow_its_tokenizer_as_transformers_and_lm_eval_do(smollm2_hf_dir, tmp_path):
    """SmolLM2-135M-Instruct adds no bos, and its bos and eos are the chat tokens <|im_start|> and <|im_end|>. The
    perplexity of a text file is transformers' exp(model(ids, labels=ids).loss) with ids = tokenizer(text).input_ids
    (the standard definition), and lm-eval's rolling loglikelihood of the text through our LM class is what its HF
    backend gives on the same weights, over several windows."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert import from_hf

    ours_dir = from_hf.convert(smollm2_hf_dir, out_dir=tmp_path / "smollm2")
    (tmp_path / "text.txt").write_text(REAL_TEXT)
    result = run_main(checkpoint_dir=ours_dir, data=tmp_path / "text.txt", out=tmp_path / "r.json")
    hf_tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([hf_tok(REAL_TEXT).input_ids])
    assert hf_tok.bos_token == "<|im_start|>" and ids[0, 0] != hf_tok.bos_token_id  # no bos added
    with torch.no_grad():
        loss = hf_model(ids, labels=ids).loss.item()
    assert result["tokens"] == ids.shape[1] - 1 and result["windows"] == 1
    # 30 float32 layers summed in different orders: the logits differ by ~1e-5 (tests/test_real_model.py)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)

    # windows of 32 tokens: the text (its first token conditioned on <|im_start|>) takes several
    theirs = HFLM(pretrained=hf_model, tokenizer=hf_tok, device="cpu", batch_size=1, max_length=32)
    ours = evaluate.make_lm(load_model(ours_dir).eval(), Tokenizer(ours_dir), batch_size=4, max_length=32)
    assert ours.tok_encode(REAL_TEXT) == theirs.tok_encode(REAL_TEXT) == ids[0].tolist()
    assert ours.prefix_token_id == theirs.prefix_token_id == hf_tok.bos_token_id
    requests = [Instance("loglikelihood_rolling", {}, (REAL_TEXT,), 0)]
    assert ours.loglikelihood_rolling(requests, disable_tqdm=True) == pytest.approx(
        theirs.loglikelihood_rolling(requests, disable_tqdm=True), rel=1e-5)
