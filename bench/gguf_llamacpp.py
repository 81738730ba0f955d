"""llama.cpp on our GGUF export: greedy tokens beside ours (f16), perplexity at q8_0 beside f16.

    .venv/bin/python bench/gguf_llamacpp.py                  # SmolLM2-135M-Instruct from the tests' GGUF cache
    .venv/bin/python bench/gguf_llamacpp.py --threads 2 --new_tokens 32 --windows 4
    .venv/bin/python bench/gguf_llamacpp.py --peer transformers     # the same checks through transformers' loader

llama.cpp runs in its own venv, `.venv-llamacpp`, through the raw C API of llama-cpp-cffi's prebuilt wheel
(llama.cpp b4965; llama-cpp-python has no binary wheel and compiles llama.cpp for most of an hour on 2 cores):

    python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install --no-deps llama-cpp-cffi==0.4.42 &&
        .venv-llamacpp/bin/pip install cffi numpy     # --no-deps: its high-level API's transformers is not needed

This script runs itself there with --worker for the llama.cpp side, and runs ours in .venv. Both sides get the same
token ids (our tokenizer's; llama.cpp's own tokenisation of each prompt is compared too). Greedy: up to --new_tokens
tokens or the end-of-turn token, for chat prompts rendered with the model's template. Perplexity: exp of the mean
negative log-likelihood of every predicted token in --windows independent windows of --window tokens of a fixed text
(this file's own source and the README, so nothing is downloaded), the same definition on both sides.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
CACHE = ROOT / ".cache" / "bench-gguf"
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Give me three tips for sleeping better.", "Explain what a neural network is in one sentence."]


def main(args):
    sys.path.insert(0, str(ROOT))
    import torch

    from checkpoint import load_model
    from convert import from_hf, to_gguf
    from tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    ours_dir = CACHE / "SmolLM2-135M-Instruct"
    if not (ours_dir / "model.safetensors").is_file():
        hf_dir = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf"  # built by the tests' smollm2_hf_dir fixture
        if not (hf_dir / "model.safetensors").is_file():
            sys.exit(f"error: {hf_dir} not found; run `pytest -m real_model tests/test_gguf.py` once to build it")
        from_hf.convert(hf_dir, out_dir=ours_dir)
    files = {dtype: to_gguf.convert(ours_dir, out=CACHE / f"smollm2-{dtype}.gguf", dtype=dtype)
             for dtype in ("f16", "q8_0")}
    tok = Tokenizer(ours_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    prompt_ids = [tok.encode(p) for p in prompts]
    text = (Path(__file__).read_text() + (ROOT / "README.md").read_text())
    ids = tok.encode(text)
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    assert all(len(w) == args.window for w in windows), "text too short for --windows x --window"

    # ours: float32 weights rounded to f16 (what the f16 file holds), so that greedy paths see the same numbers
    model = load_model(ours_dir, dtype=torch.float16).float().eval()
    ours_greedy = []
    with torch.no_grad():
        for p in prompt_ids:
            out = list(p)
            while len(out) < len(p) + args.new_tokens and out[-1] not in tok.stop_ids:
                out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
            ours_greedy.append(out[len(p):])
        nll = [torch.nn.functional.cross_entropy(model(torch.tensor([w]))[0, :-1], torch.tensor(w[1:]),
                                                 reduction="sum").item() for w in windows]
    ours_ppl = math.exp(sum(nll) / sum(len(w) - 1 for w in windows))

    job = dict(files={k: str(v) for k, v in files.items()}, prompts=prompts, prompt_ids=prompt_ids,
               windows=windows, new_tokens=args.new_tokens, stop_ids=tok.stop_ids, threads=args.threads)
    if args.peer == "llamacpp":
        result = subprocess.run([str(LLAMACPP_PYTHON), __file__, "--worker"], input=json.dumps(job), text=True,
                                capture_output=True, check=False)
        if result.returncode:  # llama.cpp logs to stderr: its tail says why
            sys.exit(f"error: the llama.cpp worker failed:\n{result.stderr[-3000:]}")
        theirs = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        theirs = transformers_peer(job)

    print(f"peer: {theirs['version']} · {args.threads} threads · SmolLM2-135M-Instruct")
    if "system" in theirs:
        print(f"llama.cpp system info: {theirs['system']}")
    same = 0
    for p, ours, cpp, cpp_tok, ids_ in zip(PROMPTS, ours_greedy, theirs["greedy"], theirs["tokenized"], prompt_ids):
        same += ours == cpp
        print(f"- {p!r}: greedy tokens equal: {ours == cpp} ({len(ours)} tokens); the peer's tokenisation of the "
              f"prompt equals ours: {cpp_tok == ids_}; answer {tok.decode(ours, skip_special_tokens=True)!r}")
        if ours != cpp:
            print(f"    peer: {tok.decode(cpp, skip_special_tokens=True)!r}")
    ppl16, ppl8 = theirs["ppl"]["f16"], theirs["ppl"]["q8_0"]
    n = sum(len(w) - 1 for w in windows)
    print(f"greedy tokens equal on {same}/{len(PROMPTS)} prompts")
    print(f"perplexity over {n} tokens ({args.windows} x {args.window}): ours (f16 weights, float32 compute) "
          f"{ours_ppl:.4f} · peer f16 {ppl16:.4f} · peer q8_0 {ppl8:.4f} "
          f"(q8_0 / f16 = {ppl8 / ppl16:.5f}, {100 * (ppl8 / ppl16 - 1):+.3f} %)")


def transformers_peer(job) -> dict:
    """The same job through transformers' GGUF loader (it dequantises the file to float32 and runs its own model)."""
    import torch
    import transformers

    out = dict(version=f"transformers {transformers.__version__} GGUF loader", greedy=[], tokenized=[], ppl={})
    for dtype, path in job["files"].items():
        path = Path(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        with torch.no_grad():
            if dtype == "f16":
                tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                for prompt, ids in zip(job["prompts"], job["prompt_ids"]):
                    out["tokenized"].append(tok(prompt)["input_ids"])
                    generated = model.generate(torch.tensor([ids]), max_new_tokens=job["new_tokens"], do_sample=False,
                                               eos_token_id=job["stop_ids"])
                    out["greedy"].append(generated[0, len(ids):].tolist())
            nll = sum(torch.nn.functional.cross_entropy(model(torch.tensor([w])).logits[0, :-1], torch.tensor(w[1:]),
                                                        reduction="sum").item() for w in job["windows"])
        out["ppl"][dtype] = math.exp(nll / sum(len(w) - 1 for w in job["windows"]))
    return out


def load_llama_cpp():
    """llama.cpp's C API from llama-cpp-cffi: (lib, ffi, version string)."""
    import ctypes
    import importlib.metadata
    import importlib.util
    import os

    # the package's __init__ imports transformers and huggingface_hub for its own high-level API; the C API is one
    # cffi extension module beside it, loaded here alone (the CPU build: the bench measures on CPU)
    package_dir = Path(importlib.util.find_spec("llama").submodule_search_locations[0])
    path = next(package_dir.glob("_llama_cpp_cpu.*.so"))
    # the wheel is built with GCC 14, whose libstdc++ has __cxa_call_terminate (called only when an exception leaves
    # a noexcept function, i.e. on the way to std::terminate); an older libstdc++ (Debian 12's GCC 12) lacks it, so
    # bind lazily: the module loads and the symbol is looked up only if it is ever called
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY)
    try:
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        build = ctypes.CDLL(str(path), mode=os.RTLD_LAZY)  # the same handle; its build-info globals are not in the cdef
    finally:
        sys.setdlopenflags(flags)
    number = ctypes.c_int.in_dll(build, "LLAMA_BUILD_NUMBER").value
    commit = ctypes.c_char_p.in_dll(build, "LLAMA_COMMIT").value.decode()
    version = f"llama.cpp b{number} ({commit}, CPU) via llama-cpp-cffi {importlib.metadata.version('llama-cpp-cffi')}"
    module.lib.llama_backend_init()
    return module.lib, module.ffi, version


def decode(lib, ffi, ctx, tokens, start, all_logits):
    """Feeds tokens to llama.cpp at positions start.. (sequence 0); the logits of every one, or of the last."""
    import numpy as np

    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(lib.llama_get_model(ctx)))
    batch = lib.llama_batch_init(len(tokens), 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, start + i, 1, 0
        batch.logits[i] = all_logits or i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    try:
        assert lib.llama_decode(ctx, batch) == 0, "llama_decode failed"
        rows = len(tokens) if all_logits else 1  # llama_get_logits holds the requested rows in batch order
        logits = ffi.buffer(lib.llama_get_logits(ctx), rows * n_vocab * 4)
        return np.frombuffer(logits, dtype=np.float32).reshape(rows, n_vocab).copy()
    finally:
        lib.llama_batch_free(batch)


def worker():
    """Runs in .venv-llamacpp: llama.cpp's greedy tokens and perplexities for the job on stdin."""
    import numpy as np

    lib, ffi, version = load_llama_cpp()
    job = json.loads(sys.stdin.read())
    out = dict(version=version, system=ffi.string(lib.llama_print_system_info()).decode().strip(), greedy=[],
               tokenized=[], ppl={})
    n_ctx = max(len(w) for w in job["windows"]) + 8
    n_ctx = max(n_ctx, max(len(p) for p in job["prompt_ids"]) + job["new_tokens"] + 8)
    for dtype, path in job["files"].items():
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(path.encode(), model_params)
        assert model != ffi.NULL, f"llama.cpp could not load {path}"
        vocab = lib.llama_model_get_vocab(model)
        ctx_params = lib.llama_context_default_params()
        # one decode call takes a whole window, in one micro-batch
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = job["threads"]
        ctx = lib.llama_init_from_model(model, ctx_params)
        assert ctx != ffi.NULL, "llama.cpp could not make a context"
        if dtype == "f16":
            for prompt, ids in zip(job["prompts"], job["prompt_ids"]):
                # the rendered prompt holds <|im_start|> etc. as text: parse_special, and no BOS of llama.cpp's own
                text = prompt.encode()
                buf = ffi.new("int32_t[]", len(text) + 8)
                n = lib.llama_tokenize(vocab, text, len(text), buf, len(text) + 8, False, True)
                out["tokenized"].append(list(buf[0:n]))
                # greedy: argmax of the logits, fed back one token at a time through the KV cache
                lib.llama_kv_self_clear(ctx)
                tokens, logits, pos = [], decode(lib, ffi, ctx, ids, 0, all_logits=False), len(ids)
                while True:
                    tokens.append(int(logits[-1].argmax()))
                    if tokens[-1] in job["stop_ids"] or len(tokens) == job["new_tokens"]:
                        break
                    logits, pos = decode(lib, ffi, ctx, tokens[-1:], pos, all_logits=False), pos + 1
                out["greedy"].append(tokens)
        nll, count = 0.0, 0
        for w in job["windows"]:
            lib.llama_kv_self_clear(ctx)
            logp = decode(lib, ffi, ctx, w, 0, all_logits=True)[:-1].astype(np.float64)
            logp -= logp.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
            count += len(w) - 1
        out["ppl"][dtype] = math.exp(nll / count)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--peer", choices=["llamacpp", "transformers"], default="llamacpp",
                            help="llamacpp: llama.cpp (llama-cpp-cffi, .venv-llamacpp); transformers: its GGUF loader")
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--new_tokens", type=int, default=32)
        parser.add_argument("--window", type=int, default=512)
        parser.add_argument("--windows", type=int, default=4)
        main(parser.parse_args())
