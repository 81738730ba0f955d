"""serve.py: the OpenAI-compatible server, driven by the official `openai` client against 127.0.0.1 on a tiny random
model. Chat with the model's own template, completions, streaming, stop strings, n > 1, greedy output equal to
generate.py's, OpenAI error bodies; and the engine's continuous batching: requests that join a running batch at
different steps produce exactly what each produces alone."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from jsonargparse import CLI

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import generate as generate_script
import serve
from checkpoint import load_model, save_checkpoint
from data_prep import train_tokenizer
from generation import generate, use_decode_layout
from model import GPT, Config, InputError
from tokenizer import Tokenizer

# A ChatML-like template in the toy tokenizer's own special tokens, so the served model has a chat template of its own
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
PROMPTS = ["def f(x):", "return x *", "def function_3_7(x):\n    return", "x", "def function_12_9(x):"]
BLOCK_SIZE = 128  # the tiny models' context: room for ~100-token completions after the prompts above


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A trained toy tokenizer (with a chat template) and two random models that share it, as tests/test_generate.py
    builds them: a plain Llama-like one and one with sliding-window layers and softcaps (the eager attention path)."""
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n"
                              for i in range(20) for j in range(20)))
    train_tokenizer.main(inputs=str(corpus), out_dir=root / "tokenizer", vocab_size=320)
    config_path = root / "tokenizer" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    dirs = {}
    for name, overrides in {"plain": {}, "windowed": dict(sliding_window=4, sliding_window_period=2,
                                                          attn_softcap=20.0, final_softcap=15.0)}.items():
        config = Config.from_name("tiny-test", vocab_size=320, block_size=BLOCK_SIZE, **overrides)
        torch.manual_seed(0)
        model = GPT(config)
        with torch.no_grad():  # large weights: peaked logits, so greedy choices are not near-ties
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        dirs[name] = save_checkpoint(root / name, config, model.state_dict(), tokenizer_dir=root / "tokenizer")
    return dirs


@pytest.fixture(scope="module")
def server(tiny_dirs):
    """serve.py's app and engine in this process: uvicorn in a thread, on a port the OS picked."""
    engine, tokenizer, name = serve.setup(tiny_dirs["plain"], max_batch_size=4, max_seq_length=BLOCK_SIZE)
    engine.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(serve.build_app(engine, tokenizer, name), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if uv.started:
            break
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield dict(url=url, engine=engine, tokenizer=tokenizer, name=name,
               client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60))
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def reference(tiny_dirs):
    """generation.generate on its own copy of the served model: what one request alone produces (greedy)."""
    model = use_decode_layout(load_model(tiny_dirs["plain"]).eval())
    tokenizer = Tokenizer(tiny_dirs["plain"])

    def run(ids: list[int], max_tokens: int) -> tuple[str, int, bool]:
        """text, tokens generated (a stop id counted, as the server counts it), and whether a stop id ended it"""
        out = generate(model, [ids], max_tokens, temperature=0, stop_ids=tokenizer.stop_ids)[0]
        stopped = len(out) < max_tokens
        return tokenizer.decode(out, skip_special_tokens=True), len(out) + stopped, stopped
    return run


def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == [server["name"]]
    assert server["client"].models.retrieve(server["name"]).id == server["name"]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["free_rows"] == 4


def test_chat_renders_the_template_and_counts_usage(server, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    reply = server["client"].chat.completions.create(model=server["name"], messages=messages, temperature=0,
                                                     max_tokens=24)
    ids = server["tokenizer"].encode(server["tokenizer"].apply_chat_template(messages), bos=False, eos=False)
    generation_prompt = server["tokenizer"].encode("<|bos|>assistant\n", bos=False, eos=False)
    assert ids[-len(generation_prompt):] == generation_prompt
    text, n_tokens, stopped = reference(ids, 24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n_tokens)
    assert reply.usage.total_tokens == len(ids) + n_tokens and reply.object == "chat.completion"


def test_greedy_completion_equals_generate_py(server, tiny_dirs, capsys):
    """temperature 0 is greedy (not replaced by a default): the same text as generate.py --temperature 0."""
    for prompt in PROMPTS[:2]:
        reply = server["client"].completions.create(model=server["name"], prompt=prompt, temperature=0, max_tokens=20)
        CLI(generate_script.main, args=["--checkpoint_dir", str(tiny_dirs["plain"]), "--prompt", prompt,
                                        "--temperature", "0", "--max_new_tokens", "20"])
        printed = capsys.readouterr().out
        assert printed == prompt + reply.choices[0].text + "\n"
        assert reply.usage.prompt_tokens == len(server["tokenizer"].encode(prompt))


def test_streaming_reassembles_to_the_whole_answer_and_ends_with_done(server):
    client, name = server["client"], server["name"]
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole = client.completions.create(model=name, prompt=PROMPTS[1], temperature=0, max_tokens=30)
    streamed = list(client.completions.create(model=name, prompt=PROMPTS[1], temperature=0, max_tokens=30,
                                              stream=True))
    assert len(streamed) > 2 and "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    # the wire format: server-sent events, the last one [DONE]
    with httpx.stream("POST", server["url"] + "/v1/completions", json=dict(prompt=PROMPTS[1], temperature=0,
                                                                           max_tokens=5, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_cut_the_text_and_never_stream_a_part_of_one(server):
    client, name = server["client"], server["name"]
    full = client.completions.create(model=name, prompt=PROMPTS[0], temperature=0, max_tokens=40).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3 and full.find(stop) >= 1, "the test needs a 3-character stop string inside the answer"
    cut = client.completions.create(model=name, prompt=PROMPTS[0], temperature=0, max_tokens=40,
                                    stop=[stop, "never appears"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    pieces = [c.choices[0].text for c in client.completions.create(model=name, prompt=PROMPTS[0], temperature=0,
                                                                   max_tokens=40, stop=stop, stream=True)]
    assert "".join(pieces) == cut.choices[0].text  # no partial stop string went out and was taken back


def test_n_completions_per_prompt(server):
    client, name = server["client"], server["name"]
    kwargs = dict(model=name, prompt=PROMPTS[3], temperature=1.0, max_tokens=12, n=3, seed=7)
    reply = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert reply.usage.prompt_tokens == len(server["tokenizer"].encode(PROMPTS[3]))  # the prompt counted once
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == texts  # the seed makes sampling repeatable
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], temperature=0,
                                          max_tokens=8, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_concurrent_clients_each_get_their_own_answer(server, reference):
    tok, results = server["tokenizer"], {}

    def ask(prompt):
        results[prompt] = server["client"].completions.create(model=server["name"], prompt=prompt, temperature=0,
                                                              max_tokens=16 + len(prompt)).choices[0].text
    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt in PROMPTS:
        assert results[prompt] == reference(tok.encode(prompt), 16 + len(prompt))[0]


@pytest.mark.parametrize("name", ["plain", "windowed"])
def test_requests_joining_a_running_batch_generate_what_they_generate_alone(tiny_dirs, name):
    """Continuous batching, step by step: prompts of different lengths arrive while others are mid-decode, more
    than there are rows (so some wait), and leave at different steps (their rows reused); each one's greedy tokens
    equal generation.generate's on that prompt alone."""
    engine, tok, _ = serve.setup(tiny_dirs[name], max_batch_size=3, max_seq_length=BLOCK_SIZE)
    prompts = [tok.encode(p) for p in PROMPTS]
    max_tokens = [20, 5, 30, 12, 25]
    arrive = [0, 0, 3, 4, 9]  # the decode step at which each request is submitted
    texts, done = [""] * len(prompts), set()

    def collector(i):
        def emit(event):
            assert "error" not in event
            texts[i] += event["text"]
            if event["finish_reason"] is not None:
                done.add(i)
        return emit

    for step in range(200):
        for i in (i for i, s in enumerate(arrive) if s == step):
            engine.submit(serve.Job(prompts[i], 1, max_tokens[i], emit=collector(i)))
        engine.step()
        if len(done) == len(prompts):
            break
    assert len(done) == len(prompts) and engine.rows == []
    model = use_decode_layout(load_model(tiny_dirs[name]).eval())
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_tokens[i], temperature=0, stop_ids=tok.stop_ids)[0]
        assert texts[i] == tok.decode(alone, skip_special_tokens=True), i


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, monkeypatch):
    engine = server["engine"]
    decode = engine.decode

    def slow_decode():  # long enough for the client to leave long before the 100 tokens are done
        time.sleep(0.02)
        decode()
    monkeypatch.setattr(engine, "decode", slow_decode)
    cancelled = engine.finished["cancelled"]
    with httpx.stream("POST", server["url"] + "/v1/completions", json=dict(prompt=PROMPTS[0], temperature=0,
                                                                           max_tokens=100, stream=True)) as r:
        next(r.iter_lines())  # the first token is out: the request holds a row
        assert engine.status()["active_rows"] == 1
    for _ in range(100):
        if engine.status()["active_rows"] == 0:
            break
        time.sleep(0.01)
    assert engine.status()["active_rows"] == 0 and engine.finished["cancelled"] == cancelled + 1
    reply = server["client"].completions.create(model=server["name"], prompt="x", max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")  # still serving


def test_bad_requests_get_openai_error_bodies_and_the_server_keeps_serving(server):
    client, name, url = server["client"], server["name"], server["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x " * BLOCK_SIZE)
    assert e.value.code == "context_length_exceeded" and f"{BLOCK_SIZE} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.completions.create(model=name, prompt="x", max_tokens=BLOCK_SIZE)
    assert e.value.code == "context_length_exceeded"
    for bad, param in [(dict(temperature=3), "temperature"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"),
                       (dict(max_tokens=0), "max_tokens"), (dict(stop=[1]), "stop"), (dict(logprobs=2), "logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=name, prompt="x", **bad)
        assert e.value.param == param and e.value.type == "invalid_request_error", bad
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[])
    assert e.value.param == "messages"

    def post(path, **kwargs):
        response = httpx.post(url + path, **kwargs)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return response.status_code, error

    assert post("/v1/chat/completions", content=b'{"messages": [')[0] == 400  # malformed JSON
    assert post("/v1/completions", content=b"[1, 2]")[0] == 400  # JSON, not an object
    assert post("/v1/completions", content=b"x" * (serve.MAX_BODY_BYTES + 1))[0] == 413
    assert post("/v1/embeddings", json={})[0] == 404
    assert httpx.get(url + "/v1/completions").status_code == 405
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert client.completions.create(model=name, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_plain_template_for_a_model_without_one(tiny_dirs):
    tok = Tokenizer(tiny_dirs["plain"])
    ids = serve.render_chat(tok, [{"role": "user", "content": "hi"}], None)
    assert tok.decode(ids, skip_special_tokens=True) == "User: hi\n\nAssistant:"


def test_a_missing_http_stack_is_one_line(monkeypatch):
    monkeypatch.setattr(serve, "MISSING_STACK", "uvicorn")
    with pytest.raises(InputError) as e:
        serve.main("unused")
    assert "\n" not in str(e.value) and "pip install" in str(e.value)
