"""generation.py and generate.py: sampling filters, batched = one at a time, cache = no cache, stop handling,
chat, bad input; on the real SmolLM2-135M-Instruct, greedy chat equals transformers' generate."""

import json
import subprocess
import sys

import pytest
import torch
from jsonargparse import CLI

import generate as generate_script
from checkpoint import load_model, save_checkpoint
from conftest import ROOT
from convert import from_hf
from data_prep import train_tokenizer
from generation import DecodeLinear, draw, filter_top_k_top_p, generate, sample, use_decode_layout
from model import GPT, Config, InputError
from tokenizer import Tokenizer

PROMPTS = ["def f(x):", "return x *", "def function_3_7(x):\n    return", "x"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A trained toy tokenizer and two random models that share it: a plain Llama-like one and one with
    sliding-window layers and softcaps (the eager attention path)."""
    root = tmp_path_factory.mktemp("gen")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for i in range(20) for j in range(20)))
    train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=320)
    dirs = {}
    for name, overrides in {"plain": {}, "windowed": dict(sliding_window=4, sliding_window_period=2,
                                                          attn_softcap=20.0, final_softcap=15.0)}.items():
        config = Config.from_name("tiny-test", vocab_size=320, block_size=64, **overrides)
        torch.manual_seed(0)
        model = GPT(config)
        with torch.no_grad():  # large weights: peaked logits, so greedy choices are not near-ties
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        dirs[name] = save_checkpoint(root / name, config, model.state_dict(), tokenizer_dir=root / "tokenizer")
    return dirs


def run_cli(*args, input=None, check=True):
    result = subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, input=input, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 50)
    kept = filter_top_k_top_p(logits, top_k=5, top_p=1.0).isfinite()
    assert kept.sum(dim=-1).tolist() == [5, 5, 5]
    assert torch.equal(kept.nonzero()[:, 1].view(3, 5).sort().values, logits.topk(5).indices.sort().values)


@pytest.mark.parametrize("top_p", [0.0, 0.05, 0.5, 0.9, 0.999])  # 0: the most likely token alone
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    torch.manual_seed(1)
    logits = torch.randn(4, 30) * 2
    kept = filter_top_k_top_p(logits, top_k=None, top_p=top_p).isfinite()
    probs = torch.softmax(logits.double(), dim=-1)
    for row in range(4):  # independent construction: add tokens by decreasing probability until the mass reaches p
        expected, mass = set(), 0.0
        for i in probs[row].argsort(descending=True).tolist():
            expected.add(i)
            mass += probs[row, i].item()
            if mass >= top_p:
                break
        assert set(kept[row].nonzero().flatten().tolist()) == expected


def test_sampling_is_greedy_at_zero_temperature_and_repeatable_with_a_seed():
    logits = torch.randn(8, 100)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    draw = lambda seed: sample(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert any(not torch.equal(draw(3), draw(s)) for s in range(4, 10))
    # a sampled token is always one the filters kept
    assert filter_top_k_top_p(logits, 20, 0.9).gather(1, draw(5)[:, None]).isfinite().all()


def test_sampled_tokens_follow_the_filtered_softmax():
    """sample() draws each token with its probability under softmax(logits / temperature) renormalised over what
    top-k kept, never a filtered one, also when a uniform draw rounds up to the row's total."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]]).repeat(20000, 1)
    tokens = sample(logits, temperature=0.7, top_k=4, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([0, 1, 2, 4])
    expected = torch.zeros(6, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[0, kept].double() / 0.7, dim=-1)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[3] == counts[5] == 0
    sigma = (len(tokens) * expected * (1 - expected)).sqrt()
    assert ((counts - len(tokens) * expected).abs() <= 4 * sigma).all(), (counts / len(tokens), expected)
    # the largest uniform below 1 on a row whose last tokens have probability 0: the last token above 0
    cdf = torch.tensor([[0.25, 0.5, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)
    below_one = torch.tensor([[1.0]], dtype=torch.float64).nextafter(torch.tensor(0.0, dtype=torch.float64))
    assert draw(cdf, below_one).tolist() == [3]
    # the first token whose cumulative probability exceeds the draw: 0.5 skips token 2 (probability 0)
    assert draw(cdf.repeat(3, 1), torch.tensor([[0.0], [0.3], [0.5]], dtype=torch.float64)).tolist() == [0, 1, 3]


@pytest.mark.parametrize("name", ["plain", "windowed"])
def test_batched_and_cached_generation_equal_one_prompt_at_a_time_without_cache(tiny_dirs, name):
    model = load_model(tiny_dirs[name]).eval()
    tok = Tokenizer(tiny_dirs[name])
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    batched = generate(model, prompts, 12, temperature=0)
    for prompt, out in zip(prompts, batched):
        assert generate(model, [prompt], 12, temperature=0) == [out]
        # reference: the full forward over the growing sequence, no cache, argmax each step
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out == ids[len(prompt):]


def test_generation_stops_at_any_stop_id(tiny_dirs):
    model = load_model(tiny_dirs["plain"]).eval()
    prompt = Tokenizer(tiny_dirs["plain"]).encode(PROMPTS[0])
    free = generate(model, [prompt], 10, temperature=0)[0]
    assert len(set(free[:4])) == 4, "the test needs four distinct first tokens"
    # the second stop id ends it; the stop token itself is not part of the output
    assert generate(model, [prompt], 10, temperature=0, stop_ids=[free[5], free[3]])[0] == free[:3]
    # rows stop independently: the other rows run to their own end
    other = Tokenizer(tiny_dirs["plain"]).encode(PROMPTS[2])
    both = generate(model, [prompt, other], 10, temperature=0, stop_ids=[free[3]])
    assert both[0] == free[:3]
    assert both[1] == generate(model, [other], 10, temperature=0, stop_ids=[free[3]])[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_that_stop_leave_the_batch_and_the_others_decode_as_alone(tiny_dirs, temperature):
    """A row that produced a stop id is dropped from the batch (and its KV cache) once a quarter of the batch has
    stopped; every row still produces what it produces alone (sampling: each row its own generator)."""
    model = load_model(tiny_dirs["plain"]).eval()
    tok = Tokenizer(tiny_dirs["plain"])
    prompts = [tok.encode(p) for p in PROMPTS] * 2
    free = generate(model, prompts, 12, temperature=0)
    stop_ids = sorted({out[step] for out, step in zip(free, range(1, 12))})  # rows stop at different steps
    batch_sizes = []
    forward = model.forward
    model.forward = lambda idx, **kw: batch_sizes.append(len(idx)) or forward(idx, **kw)
    try:
        seeded = lambda rows: [torch.Generator().manual_seed(row) for row in rows]  # noqa: E731
        together = generate(model, prompts, 12, temperature=temperature, stop_ids=stop_ids,
                            generator=seeded(range(len(prompts))))
        sizes, batch_sizes[:] = list(batch_sizes), []
        alone = [generate(model, [p], 12, temperature=temperature, stop_ids=stop_ids, generator=seeded([row]))[0]
                 for row, p in enumerate(prompts)]
    finally:
        del model.forward
    assert together == alone
    assert len({len(out) for out in together}) > 2  # rows ended at different steps ...
    # ... and left the batch
    assert sizes[0] == len(prompts) and sizes[-1] < len(prompts) and sizes == sorted(sizes, reverse=True)


def test_cli_prompts_file_samples_and_stop_strings(tiny_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    common = ["--checkpoint_dir", tiny_dirs["plain"], "--max_new_tokens", 16]
    out = run_cli(*common, "--prompts_file", prompts, "--num_samples", 2, "--temperature", 1.0, "--seed", 7).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, s) for p in PROMPTS[:2] for s in range(2)]
    again = [json.loads(line) for line in run_cli(*common, "--prompts_file", prompts, "--num_samples", 2,
                                                  "--temperature", 1.0, "--seed", 7).stdout.splitlines()]
    assert again == rows  # the seed makes sampling repeatable
    greedy = run_cli(*common, "--prompt", PROMPTS[0], "--temperature", 0).stdout
    completion = greedy[len(PROMPTS[0]):].rstrip("\n")
    assert greedy.startswith(PROMPTS[0]) and len(completion) > 6
    stop = completion[3:6]
    cut = run_cli(*common, "--prompt", PROMPTS[0], "--temperature", 0, "--stop", json.dumps([stop])).stdout
    assert cut.rstrip("\n") == PROMPTS[0] + completion[:completion.find(stop)]


def test_plain_chat_for_a_model_without_template_keeps_the_conversation(tiny_dirs):
    result = run_cli("--checkpoint_dir", tiny_dirs["plain"], "--chat", "true", "--temperature", 0,
                     "--max_new_tokens", 8, input="def f(x):\n/reset\ndef f(x):\n/exit\nnever read\n")
    assert "plain 'User: / Assistant:'" in result.stderr
    # /reset forgets the first exchange: the same question gets the same answer, twice, and /exit ends it
    half = len(result.stdout) // 2
    assert half > 1 and result.stdout[:half] == result.stdout[half:]


@pytest.mark.parametrize("args,message", [
    (["--checkpoint_dir", "/nonexistent"], "model_config.yaml: not found"),
    (["--precision", "bf16-mixed"], "--precision 'bf16-mixed': expected one of"),
    (["--quantize", "bnb.nf3"], "--quantize 'bnb.nf3': expected one of"),
    (["--prompt", "def f(x): return x " * 30], "leaves no room to generate within the model's block_size of 64"),
    (["--prompts_file", "/nonexistent.txt"], "--prompts_file /nonexistent.txt: not found"),
])
def test_bad_input_is_one_line(tiny_dirs, args, message):
    """Run in this process: what generate.py's __main__ prints after 'error: ' (tests/test_bad_input.py runs one real
    __main__)."""
    if "--checkpoint_dir" not in args:
        args = ["--checkpoint_dir", tiny_dirs["plain"], *args]
    with pytest.raises(InputError) as e:
        CLI(generate_script.main, args=[str(a) for a in args], exit_on_error=False)
    assert "\n" not in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.real_model
def test_smollm2_greedy_chat_equals_transformers(smollm2_hf_dir, tmp_path):
    """The issue's reference check: greedy chat over 32 new tokens equals transformers' generate token for
    token, in a two-turn conversation (the second turn reuses the KV cache of the first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours_dir = from_hf.convert(smollm2_hf_dir, out_dir=tmp_path / "smollm2")
    turns = ["What is the capital of France?", "And of Germany?"]
    result = run_cli("--checkpoint_dir", ours_dir, "--chat", "true", "--temperature", 0, "--max_new_tokens", 32,
                     input="\n".join(turns) + "\n")
    replies = result.stdout.splitlines()
    assert len(replies) == 2 and "Paris" in replies[0] and "Berlin" in replies[1], result.stdout

    hf_tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    messages = []
    for turn, reply in zip(turns, replies):
        messages.append({"role": "user", "content": turn})
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]
        expected = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        if expected[-1] in Tokenizer(ours_dir).stop_ids:
            expected = expected[:-1]
        ours = Tokenizer(ours_dir).encode(reply, bos=False, eos=False)
        assert ours == expected, (hf_tok.decode(expected), reply)
        messages.append({"role": "assistant", "content": reply})


@pytest.mark.real_model
def test_smollm2_chat_in_bfloat16_answers(smollm2_hf_dir, tmp_path):
    # LitGPT's chat degenerates on this model in bf16 while its generate answers: check ours in bf16 too.
    ours_dir = from_hf.convert(smollm2_hf_dir, out_dir=tmp_path / "smollm2")
    result = run_cli("--checkpoint_dir", ours_dir, "--chat", "true", "--temperature", 0, "--max_new_tokens", 32,
                     "--precision", "bf16-true", input="What is the capital of France?\nAnd of Germany?\n")
    replies = result.stdout.splitlines()
    assert len(replies) == 2 and "Paris" in replies[0] and "Berlin" in replies[1], result.stdout


@pytest.mark.parametrize("mode,bound", [("bnb.nf4", 0.1), ("bnb.int8", 0.02)])
def test_quantized_generation_stays_close_to_float(tiny_dirs, mode, bound):
    """Weight-only quantisation moves a weight by under 10 % of its block's absmax for nf4 (16 levels) and
    well under 1 % for int8; through a model with the usual init (not the fixture's chaotic large weights) the
    logits move by a similar relative amount."""
    from quantize import quantize_model

    config = load_model(tiny_dirs["plain"]).config
    torch.manual_seed(0)
    model = GPT(config).eval()
    torch.manual_seed(0)  # the same weights again, then quantised
    quantized = quantize_model(GPT(config), mode).eval()
    idx = torch.tensor([Tokenizer(tiny_dirs["plain"]).encode(PROMPTS[2])])
    with torch.no_grad():
        exact, approx = model(idx), quantized(idx)
    error = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < error < bound
    result = run_cli("--checkpoint_dir", tiny_dirs["plain"], "--prompt", PROMPTS[2], "--temperature", 0,
                     "--max_new_tokens", 8, "--quantize", mode)
    assert result.stdout.startswith(PROMPTS[2]) and mode in result.stderr


@pytest.mark.slow
def test_compiled_blocks_generate_the_same_tokens(tiny_dirs):
    args = ["--checkpoint_dir", tiny_dirs["plain"], "--prompt", PROMPTS[2], "--temperature", 0, "--max_new_tokens", 12]
    assert run_cli(*args, "--compile", "true").stdout == run_cli(*args).stdout


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True},
                                       {"qkv_bias": True, "mlp_bias": True, "mlp": "moe", "n_expert": 3,
                                        "n_expert_per_token": 2}], ids=["untied", "tied", "biases-moe"])
@pytest.mark.parametrize("rows", [1, 8])  # 1: column-major matrices; 8: row-major
def test_decode_layout_changes_layout_not_results(overrides, rows):
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-test", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases start at zero: make them count
            p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        logits = model(idx)
    tokens = generate(model, idx.tolist(), 10)
    use_decode_layout(model, rows)

    # a module swap that model.modules() shows, not a forward replaced on each instance
    assert not any(type(m) is torch.nn.Linear or "forward" in vars(m) for m in model.modules())
    assert any(isinstance(m, DecodeLinear) for m in model.modules())
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    assert head.stride() == ((1, head.shape[0]) if rows == 1 else (head.shape[1], 1))
    # every matrix in one block of memory (the huge-page arena)
    assert len({m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, DecodeLinear)}) == 1
    for block in model.layers:
        attn = block.attn
        stacked = attn.qkv_weight
        assert stacked.shape[0] == sum(p.weight.shape[0] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        unit = 0 if rows == 1 else 1  # the dimension whose elements are adjacent in memory
        assert stacked.stride()[unit] == 1 and attn.o_proj.weight.stride()[unit] == 1
        # the separate weights are views into the stacked matrix: one copy of the values, shared
        assert attn.k_proj.weight.data_ptr() == stacked[attn.q_proj.weight.shape[0]:].data_ptr()
        mlps = block.mlp.experts if model.config.mlp == "moe" else [block.mlp]
        for mlp in mlps:
            assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.weight.shape[0]:].data_ptr()
        if model.config.qkv_bias:
            assert torch.equal(attn.qkv_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=1e-5)
    assert generate(model, idx.tolist(), 10) == tokens

    # loading into the laid-out model writes through the views into the stacked matrices
    other = GPT(model.config).eval()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), other(idx), atol=1e-5, rtol=1e-5)
