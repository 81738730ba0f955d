"""serve.py under load: aggregate tokens/s and per-request latency with 1, 4 and 16 concurrent streaming clients,
beside `litgpt serve` on the same model in the same run.

    python bench/serve_load.py                                # SmolLM2-135M-Instruct, ours then LitGPT's server
    python bench/serve_load.py --clients 1 4 16 --max_tokens 64 --peer false

The model is SmolLM2-135M-Instruct from the tests' transformers directory (.cache/SmolLM2-135M-Instruct-hf, built by
`pytest -m real_model`), converted once with `python -m convert.from_hf` for us and with `litgpt convert_to_litgpt`
for LitGPT (from .venv-peers: pip install litgpt litserve there, with a constraint that keeps its torch). Each server
runs in its own process with the machine's cores; one at a time. Every client is an OpenAI-style streaming chat
client (POST /v1/chat/completions, stream: true) that sends its requests one after the other; each phase runs
--clients clients at once, each with a different question, greedy where the server allows it (LitGPT's server
replaces temperature 0 with its default). Tokens are counted by re-tokenising each streamed answer with the model's
tokenizer, the same way for both servers. Aggregate tokens/s = all tokens of the phase / its wall time; latency =
request sent to its last event; TTFT = to its first token.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HF_DIR = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf"
CACHE = ROOT / ".cache" / "bench-serve"
PEER_BIN = ROOT / ".venv-peers" / "bin"
QUESTIONS = ["What is the capital of France?", "Explain photosynthesis in simple terms.",
             "Write a short poem about the sea.", "How do I sort a list in Python?",
             "What causes the seasons on Earth?", "Give me three tips for better sleep.",
             "Who wrote Pride and Prejudice?", "What is the difference between weather and climate?",
             "Describe how a rainbow forms.", "What is a prime number?", "Why is the sky blue?",
             "Summarise the plot of Romeo and Juliet.", "How does a refrigerator work?",
             "What are the benefits of exercise?", "Translate 'good morning' into Spanish and French.",
             "What is machine learning?"]


def prepare(peer: bool) -> tuple[Path, Path | None]:
    """Our checkpoint directory and LitGPT's, converted once from the transformers directory."""
    if not (HF_DIR / "model.safetensors").is_file():
        sys.exit(f"{HF_DIR}: not found; run `pytest -m real_model tests/test_real_model.py` once to build it")
    ours = CACHE / "ours"
    if not (ours / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "convert.from_hf", str(HF_DIR), "--out_dir",
                        str(ours)], cwd=ROOT, check=True)
    if not peer:
        return ours, None
    theirs = CACHE / "litgpt" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    if not (theirs / "lit_model.pth").is_file():
        theirs.mkdir(parents=True, exist_ok=True)
        for f in HF_DIR.iterdir():
            shutil.copy(f, theirs / f.name)
        subprocess.run([str(PEER_BIN / "litgpt"), "convert_to_litgpt", str(theirs)], check=True)
        (theirs / "model.safetensors").unlink()
    return ours, theirs


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    # its own process group: LitServe's workers are processes of their own, which stop() must end too
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"{cmd[0]} exited: see {log}")
        time.sleep(0.5)
    stop(proc)
    sys.exit(f"the server did not come up in 5 minutes: see {log}")


def stop(proc: subprocess.Popen) -> None:
    """End the server and every process it started (its process group)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


async def ask(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first, text = None, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    return {"latency": time.perf_counter() - start, "ttft": first or float("nan"), "text": text}


async def phase(url: str, model: str, n_clients: int, requests_per_client: int, max_tokens: int) -> list[dict]:
    async def one_client(c: int) -> list[dict]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            return [await ask(client, url, model, QUESTIONS[(c + r * n_clients) % len(QUESTIONS)], max_tokens)
                    for r in range(requests_per_client)]
    results = await asyncio.gather(*(one_client(c) for c in range(n_clients)))
    return [r for client in results for r in client]


def measure(name: str, url: str, model: str, clients: list[int], requests: int, max_tokens: int, tokenizer) -> list:
    asyncio.run(phase(url, model, 1, 1, 8))  # warm-up: allocator, thread pool, first-request set-up
    rows = []
    for n in clients:
        per_client = max(1, requests // n)  # about the same number of requests in every phase (at least one each)
        start = time.perf_counter()
        results = asyncio.run(phase(url, model, n, per_client, max_tokens))
        wall = time.perf_counter() - start
        tokens = [len(tokenizer.encode(r["text"], bos=False, eos=False)) for r in results]
        latencies = sorted(r["latency"] for r in results)
        rows.append(dict(server=name, clients=n, requests=len(results), tokens=sum(tokens),
                         tokens_per_sec=sum(tokens) / wall, p50=percentile(latencies, 50),
                         p95=percentile(latencies, 95), ttft_p50=percentile(sorted(r["ttft"] for r in results), 50),
                         mean_tokens=statistics.mean(tokens)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per phase (at least one per client)")
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--max_batch_size", type=int, default=16, help="serve.py's rows")
    parser.add_argument("--peer", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    args = parser.parse_args()
    from tokenizer import Tokenizer

    ours, theirs = prepare(args.peer and (PEER_BIN / "litgpt").is_file())
    tokenizer = Tokenizer(ours)
    servers = [("serve.py", [sys.executable, "serve.py", "--checkpoint_dir", str(ours), "--max_batch_size",
                             str(args.max_batch_size), "--max_seq_length", "1024", "--model_name", "smollm2"])]
    if theirs is not None:
        # --max_new_tokens: LitGPT's server takes the length from its command line, not from the request;
        # --precision: its default on a CPU is bf16-true, ours (and this bench) float32
        servers.append(("litgpt serve", [str(PEER_BIN / "litgpt"), "serve", str(theirs), "--accelerator", "cpu",
                                         "--stream", "true", "--openai_spec", "true", "--precision", "32-true",
                                         "--max_new_tokens", str(args.max_tokens), "--timeout", "900"]))
    rows = []
    for name, cmd in servers:
        port = free_port()
        log = CACHE / f"{name.split()[0]}.log"
        proc = start(cmd + ["--port", str(port)], port, log)
        try:
            rows += measure(name, f"http://127.0.0.1:{port}", "smollm2", args.clients, args.requests,
                            args.max_tokens, tokenizer)
        finally:
            stop(proc)

    print(f"SmolLM2-135M-Instruct, fp32, CPU ({os.cpu_count()} cores), streaming chat clients, max_tokens "
          f"{args.max_tokens}, ~{args.requests} requests per phase")
    print(f"{'server':<14}{'clients':>8}{'requests':>9}{'tokens':>8}{'tokens/s':>10}{'x 1 client':>11}"
          f"{'p50 s':>8}{'p95 s':>8}{'TTFT p50':>10}")
    for row in rows:
        base = next(r for r in rows if r["server"] == row["server"] and r["clients"] == args.clients[0])
        print(f"{row['server']:<14}{row['clients']:>8}{row['requests']:>9}{row['tokens']:>8}"
              f"{row['tokens_per_sec']:>10.1f}{row['tokens_per_sec'] / base['tokens_per_sec']:>10.2f}x"
              f"{row['p50']:>8.2f}{row['p95']:>8.2f}{row['ttft_p50']:>8.2f} s")


if __name__ == "__main__":
    main()
