"""An OpenAI-compatible HTTP server with continuous batching: concurrent clients share the model, each request joining
the running batch when it arrives and leaving it when it ends.

    python serve.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct              # 127.0.0.1:8000
    python serve.py --checkpoint_dir DIR --port 8080 --host 0.0.0.0 --max_batch_size 32
    python serve.py --checkpoint_dir DIR --precision bf16-true --quantize bnb.nf4 --device cuda
    python serve.py --lora_dir out/finetune_lora/final                                 # base + unmerged adapter

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}'

Endpoints: POST /v1/chat/completions and /v1/completions (stream: true sends server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health. Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1").

The HTTP stack is Starlette on uvicorn (pip install 'gptkit[serve]'): the ASGI toolkit and server under FastAPI,
vLLM's and LitServe's servers, without FastAPI's pydantic layer, whose 422 validation bodies are not OpenAI's error
shape anyway. Starlette's StreamingResponse notices a client that goes away and cancels its stream, which is how a
disconnected client's slot is freed.

How the batching works: one engine thread owns the model and a KV cache of --max_batch_size rows ("slots", gpt-fast
style: one row per sequence). Between two decode steps it frees the rows of sequences that ended or whose client left,
and prefills waiting requests into free rows; then one decode step advances every row, each at its own position
(GPT.forward's input_pos (B, 1)). The active rows are kept at the front of the cache (a finished row is replaced by
the last one), so a step computes only the rows in use.
"""

import asyncio
import json
import random
import sys
import threading
import time
import traceback
import uuid
from argparse import ArgumentError
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jsonargparse import CLI

from checkpoint import load_model, require, weights_dtype
from generation import sample, use_decode_layout
from model import InputError
from tokenizer import Tokenizer, compile_template

try:  # the HTTP stack is an optional extra: without it, a one-line error (main) rather than a traceback
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    MISSING_STACK = None
except ImportError as e:
    MISSING_STACK = e.name

# For base models without a chat template: a plain transcript, and the turn marker that ends a reply (as generate.py).
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")
PLAIN_CHAT_STOP = "\nUser:"
MAX_BODY_BYTES = 8 << 20  # a larger request is refused with 413 before it is read (prompts are tokens, not MBs)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is the room left in the context


def main(
    checkpoint_dir: Path | None = None,
    *,
    lora_dir: Path | None = None,
    quantize: str | None = None,
    precision: str = "32-true",
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_seq_length: int = 2048,
    model_name: str | None = None,
) -> None:
    """Serve a checkpoint directory over HTTP with the OpenAI API.

    Args:
        checkpoint_dir: the model (model.safetensors, model_config.yaml, tokenizer files). Optional with --lora_dir,
            whose lora_config.yaml names its base.
        lora_dir: a LoRA run's adapter directory, loaded on top of its base checkpoint.
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8: quantise the linear layers with bitsandbytes.
        precision: 32-true, bf16-true or 16-true: the dtype of the weights and activations.
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        host: the address to listen on (0.0.0.0: every interface).
        port: the TCP port to listen on.
        max_batch_size: sequences decoded together (rows of the KV cache); a request with n > 1 takes n of them.
        max_seq_length: the context of each row (prompt + completion); capped at the model's block_size.
        model_name: the name clients pass as `model` (default: the checkpoint or LoRA directory's name).
    """
    if MISSING_STACK is not None:
        raise InputError(f"serve.py needs starlette and uvicorn ({MISSING_STACK} is missing): "
                         "pip install 'starlette>=0.40' 'uvicorn>=0.30'  (or pip install -e '.[serve]')")
    require(1 <= port <= 65535, "--port", port, "a TCP port, 1 to 65535")
    engine, tokenizer, name = setup(checkpoint_dir, lora_dir=lora_dir, quantize=quantize, precision=precision,
                                    device=device, max_batch_size=max_batch_size, max_seq_length=max_seq_length,
                                    model_name=model_name)
    engine.start()
    print(f"serving {name} on http://{host}:{port}/v1 ({max_batch_size} rows of {engine.max_seq_length} tokens)",
          file=sys.stderr)
    uvicorn.run(build_app(engine, tokenizer, name), host=host, port=port, log_level="info")


def setup(checkpoint_dir=None, *, lora_dir=None, quantize=None, precision="32-true", device="auto",
          max_batch_size=16, max_seq_length=2048, model_name=None) -> tuple["Engine", Tokenizer, str]:
    """The engine (not started), the tokenizer and the served model's name: what build_app needs."""
    dtype = weights_dtype(precision, allowed=("32-true", "bf16-true", "16-true"))
    if quantize is not None:
        from quantize import MODES  # bitsandbytes loads only when asked for

        if quantize not in MODES:
            raise InputError(f"--quantize {quantize!r}: expected one of {', '.join(MODES)}")
    if checkpoint_dir is None and lora_dir is None:
        raise InputError("--checkpoint_dir: required (or --lora_dir, whose config names its base)")
    require(max_batch_size >= 1, "--max_batch_size", max_batch_size, "a positive integer")
    require(max_seq_length >= 2, "--max_seq_length", max_seq_length, "at least 2 tokens")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tokenizer_dir = load(checkpoint_dir, lora_dir, device, dtype, quantize)
    use_decode_layout(model)
    tokenizer = Tokenizer(tokenizer_dir)
    engine = Engine(model, tokenizer, max_batch_size, min(max_seq_length, model.config.block_size))
    return engine, tokenizer, model_name or Path(lora_dir or checkpoint_dir).resolve().name


def load(checkpoint_dir, lora_dir, device, dtype, quantize):
    """The model in eval mode on device, and the directory of its tokenizer."""
    if lora_dir is not None:
        from checkpoint import load_lora_model

        model, base_dir = load_lora_model(lora_dir, base_dir=checkpoint_dir, device=device, dtype=dtype,
                                          quantize=quantize)
        return model.eval(), base_dir if not (Path(lora_dir) / "tokenizer.json").is_file() else lora_dir
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize, compute_dtype=dtype)
    return model.eval(), checkpoint_dir


# ---------------------------------------------------------------------------------------------------------------------
# The engine: one thread, the model, a KV cache of max_batch_size rows, and the loop that admits, decodes and frees.


@dataclass
class Job:
    """One prompt and its n completions. emit(event) hands each event to the client's handler (from the engine
    thread), an event being {"index", "text" (new text), "finish_reason" (None until the last), "tokens"} or
    {"error": message}. The handler sets cancelled when its client goes away."""
    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    emit: Callable[[dict], None] = print
    first_index: int = 0  # the choice index of this job's first completion (a request of several prompts)
    cancelled: bool = False
    generator: torch.Generator | None = None


@dataclass
class Row:
    """A sequence being generated: one row of the KV cache."""
    job: Job
    index: int  # its choice index
    pos: int  # the cache slot (= position) of the next token to feed
    token: int = 0  # the token to feed next: the last one sampled
    ids: list[int] = field(default_factory=list)  # the completion's tokens so far
    sent: str = ""  # the text handed to the client so far


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int, max_seq_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.device = model.embed.weight.device
        self.stop_ids = set(tokenizer.stop_ids)
        model.set_kv_cache(max_batch_size, max_seq_length)
        # The whole cache, per layer. Before each forward, each layer's KVCache is pointed at the rows in use
        # (use_rows): views, so what the model writes lands here.
        self.cache = [(block.attn.kv_cache.k, block.attn.kv_cache.v) for block in model.layers]
        self.rows: list[Row] = []  # the active rows, in cache order: self.rows[i] is cache row i
        self.waiting: deque[Job] = deque()
        self.wakeup = threading.Condition()
        self.finished = Counter()  # rows ended, by reason ("stop", "length", "cancelled", "error"): for tests and logs
        self.thread = None
        self.threads = torch.get_num_threads()  # OpenMP's thread count is per thread: the engine's must be set

    def submit(self, job: Job) -> None:
        """Queue a job (any thread). It is admitted when n rows are free."""
        if job.temperature > 0:
            job.generator = torch.Generator(self.device).manual_seed(
                job.seed if job.seed is not None else random.getrandbits(63))
        with self.wakeup:
            self.waiting.append(job)
            self.wakeup.notify()

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self.wakeup:
                while not self.waiting and not self.rows:
                    self.wakeup.wait()
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step (out of memory, ...) fails its jobs, not the server
                traceback.print_exc()
                for job in {id(r.job): r.job for r in self.rows}.values():
                    job.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                self.finished["error"] += len(self.rows)
                self.rows = []

    @torch.inference_mode()
    def step(self) -> None:
        """Free the rows of cancelled jobs, admit the waiting jobs that fit, then one decode step for every row."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job.cancelled:
                self.free(i, "cancelled")
        while self.waiting and len(self.rows) + self.waiting[0].n <= self.max_batch_size:
            with self.wakeup:
                job = self.waiting.popleft()
            if not job.cancelled:
                self.prefill(job)
        if self.rows:
            self.decode()

    def prefill(self, job: Job) -> None:
        """The prompt into n new rows at the end of the active ones, one forward for the n (as generation.generate
        does for num_samples), and the first token of each."""
        start = len(self.rows)
        T = len(job.prompt)
        self.use_rows(start, start + job.n)
        try:
            idx = torch.tensor([job.prompt] * job.n, device=self.device)
            logits = self.model(idx, input_pos=torch.arange(T, device=self.device), last_only=True)[:, -1]
        except Exception as e:  # noqa: BLE001 - as in run: this job fails, the server goes on
            job.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
            self.finished["error"] += job.n
            traceback.print_exc()
            return
        self.rows += [Row(job, job.first_index + i, pos=T) for i in range(job.n)]
        self.advance(list(range(start, start + job.n)), logits)

    def decode(self) -> None:
        self.use_rows(0, len(self.rows))
        tokens = torch.tensor([[r.token] for r in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.pos] for r in self.rows], device=self.device)  # (B, 1): each row's own
        logits = self.model(tokens, input_pos=positions)[:, -1]
        for r in self.rows:
            r.pos += 1
        self.advance(list(range(len(self.rows))), logits)

    def advance(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of these rows from their logits (len(rows), vocab_size), hand it on, and free the
        rows that ended. Greedy rows share one argmax; each sampling job draws from its own generator."""
        tokens = logits.argmax(dim=-1)
        groups = {}
        for i, row in enumerate(rows):
            groups.setdefault(id(self.rows[row].job), []).append(i)
        for members in groups.values():
            job = self.rows[rows[members[0]]].job
            if job.temperature > 0:
                picked = torch.tensor(members, device=self.device)
                tokens[picked] = sample(logits[picked], job.temperature, job.top_k, job.top_p, job.generator)
        ended = []
        for row, token in zip(rows, tokens.tolist()):
            reason = self.append(self.rows[row], token)
            if reason is not None:
                ended.append((row, reason))
        for row, reason in sorted(ended, reverse=True):  # from the back, so the indices ahead stay valid
            self.free(row, reason)

    def append(self, row: Row, token: int) -> str | None:
        """Add a sampled token to a row and send the text it completes; the finish reason if the row ends here.
        The whole completion is decoded each time (not token by token), so that a character split across tokens
        comes out whole; an incomplete one is held back, and so are the last characters that could still turn out
        to start a stop string (cut before it, as OpenAI does)."""
        job = row.job
        row.ids.append(token)
        row.token = token
        reason = None
        if token in self.stop_ids:
            text, reason = self.tokenizer.decode(row.ids[:-1], skip_special_tokens=True), "stop"
        else:
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in job.stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            elif len(row.ids) >= job.max_tokens or row.pos >= self.max_seq_length:
                reason = "length"  # (or no cache slot left to feed this token to)
            else:
                hold = max((len(s) for s in job.stop), default=1) - 1
                text = text.rstrip("\ufffd")
                text = text[:len(text) - hold]
        new = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent += new
        if new or reason is not None:
            job.emit({"index": row.index, "text": new, "finish_reason": reason, "tokens": len(row.ids)})
        return reason

    def free(self, i: int, reason: str) -> None:
        """End row i: the last active row moves into its place (its cache slots copied), so that the active rows
        stay at the front of the cache and a decode step computes no idle ones."""
        self.finished[reason] += 1
        last = len(self.rows) - 1
        if i != last:
            filled = self.rows[last].pos  # slots 0 .. pos - 1 hold its keys and values
            for k, v in self.cache:
                k[i, :, :filled] = k[last, :, :filled]
                v[i, :, :filled] = v[last, :, :filled]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    def use_rows(self, start: int, stop: int) -> None:
        for block, (k, v) in zip(self.model.layers, self.cache):
            block.attn.kv_cache.k, block.attn.kv_cache.v = k[start:stop], v[start:stop]

    def status(self) -> dict:
        return {"status": "ok" if self.thread is None or self.thread.is_alive() else "engine stopped",
                "active_rows": len(self.rows), "free_rows": self.max_batch_size - len(self.rows),
                "waiting_requests": len(self.waiting)}


# ---------------------------------------------------------------------------------------------------------------------
# HTTP: the OpenAI request and response shapes (https://platform.openai.com/docs/api-reference/chat).


class APIError(Exception):
    """An error the client caused (or a server one), sent as OpenAI's body {"error": {...}} with its status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self):
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# Parameters of the OpenAI API this server does not implement, and the value that means "off": a request that turns
# one on gets a 400 rather than a silently different answer.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "audio": (None,),
               "prediction": (None,), "response_format": (None, {"type": "text"})}


def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str):
    created = int(time.time())
    template = tokenizer.chat_template

    async def chat_completions(request: Request):
        body = await read_body(request)
        check_model(body, model_name)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
        prompt = render_chat(tokenizer, [check_message(m, i) for i, m in enumerate(messages)], template)
        stop = [] if template is not None else [PLAIN_CHAT_STOP]
        jobs = make_jobs(body, [prompt], engine.max_seq_length, engine.max_batch_size, default_max_tokens=None,
                         extra_stop=stop)
        return await respond(request, engine, jobs, body, model_name, chat=True)

    async def completions(request: Request):
        body = await read_body(request)
        check_model(body, model_name)
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        jobs = make_jobs(body, [tokenizer.encode(p) for p in prompts], engine.max_seq_length, engine.max_batch_size,
                         default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await respond(request, engine, jobs, body, model_name, chat=False)

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptkit",
                "max_model_len": engine.max_seq_length}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request):
        if request.path_params["model"] != model_name:
            raise APIError(404, f"The model `{request.path_params['model']}` does not exist.", "model",
                           "model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request):
        status = engine.status()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    async def api_error(request, e: APIError):
        return e.response()

    async def http_error(request, e: HTTPException):  # unknown path (404), wrong method (405), in OpenAI's shape
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        code="not_found" if e.status_code == 404 else None).response()

    async def server_error(request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})


async def read_body(request) -> dict:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:  # chunked bodies have no content-length
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    for name, off in UNSUPPORTED.items():
        if body.get(name, None) not in off:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    return body


def check_model(body: dict, model_name: str) -> None:
    name = body.get("model", model_name)  # OpenAI requires it; curl users may leave it out
    if name != model_name:
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`).", "model",
                       "model_not_found")


def check_message(message, i: int) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: the text ones, joined (images are for other models)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str | None):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                       f"messages[{i}].content")
    return {**message, "content": content or ""}


def render_chat(tokenizer: Tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """The prompt's token ids: the model's own chat template with the generation prompt (as generate.py --chat)."""
    try:
        if template is None:
            return tokenizer.encode(compile_template(PLAIN_CHAT_TEMPLATE).render(messages=messages,
                                                                                 add_generation_prompt=True))
        # The template writes the special tokens itself (bos included), as transformers' apply_chat_template does.
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=False,
                                eos=False)
    except InputError as e:  # the template's raise_exception: a conversation it does not accept
        raise APIError(400, str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - jinja2 errors: a message missing what the template reads
        raise APIError(400, f"the chat template could not render these messages: {type(e).__name__}: {e}",
                       "messages") from None


def make_jobs(body: dict, prompts: list[list[int]], max_seq_length: int, max_batch_size: int,
              default_max_tokens: int | None, extra_stop: list[str] = ()) -> list[Job]:
    """The request's sampling parameters, checked as OpenAI checks them, as one Job per prompt."""
    def number(name, default, low, high, integer=False):
        value = body.get(name)
        if value is None:
            return default
        kind = int if integer else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
            raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'} from {low} to {high}, "
                                f"got {value!r}", name, "invalid_value")
        return value

    temperature = number("temperature", 1.0, 0, 2)  # OpenAI's range and default; 0 is greedy, as it says
    top_p = number("top_p", 1.0, 0, 1)
    if top_p == 0:  # the fewest tokens whose probability reaches 0: the most likely one alone
        temperature = 0.0
    top_k = number("top_k", None, 1, 2**31, integer=True)  # not OpenAI's: vLLM's extension
    n = number("n", 1, 1, max_batch_size, integer=True)
    seed = number("seed", None, -2**63, 2**63 - 1, integer=True)
    max_tokens = number("max_completion_tokens", None, 1, 2**31, integer=True)
    max_tokens = number("max_tokens", None, 1, 2**31, integer=True) if max_tokens is None else max_tokens
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_value")
    stop = [s for s in [*stop, *extra_stop] if s]
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "'stream' must be true or false", "stream", "invalid_value")

    jobs = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise APIError(400, "the prompt is empty: generation needs at least one token", "prompt")
        room = max_seq_length - len(prompt)  # tokens the context has left for the completion
        if room < 1 or max_tokens is not None and max_tokens > room:
            asked = f", and {max_tokens} tokens for the completion" if max_tokens is not None else ""
            raise APIError(400, f"This model's maximum context length is {max_seq_length} tokens. However, the "
                                f"prompt has {len(prompt)} tokens{asked}. Please shorten the prompt or the completion.",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        limit = max_tokens or (min(default_max_tokens, room) if default_max_tokens else room)
        jobs.append(Job(prompt, n, limit, temperature, top_p, top_k, stop,
                        None if seed is None else seed + i, first_index=i * n))
    return jobs


async def respond(request, engine: Engine, jobs: list[Job], body: dict, model_name: str, chat: bool):
    """Submit the jobs, then stream their events as server-sent events, or wait for all and answer once."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()

    def emit(event):  # called from the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass

    for job in jobs:
        job.emit = emit
        engine.submit(job)
    n_choices = sum(job.n for job in jobs)
    usage = {"prompt_tokens": sum(len(job.prompt) for job in jobs), "completion_tokens": 0, "total_tokens": 0}
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    common = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
              "model": model_name}

    def cancel():
        for job in jobs:
            job.cancelled = True

    finished = [0]

    def account(event: dict) -> dict:
        if "error" in event:
            raise APIError(500, event["error"], type="server_error")
        if event["finish_reason"] is not None:
            finished[0] += 1
            usage["completion_tokens"] += event["tokens"]
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return event

    if body.get("stream", False):
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunk = {**common, "object": "chat.completion.chunk" if chat else "text_completion"}

        def sse(data) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                if chat:  # OpenAI's first chunk of each choice carries the role
                    for i in range(n_choices):
                        yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                while finished[0] < n_choices:
                    event = account(await events.get())
                    choice = {"index": event["index"], "logprobs": None, "finish_reason": event["finish_reason"]}
                    if chat:
                        choice["delta"] = {"content": event["text"]} if event["text"] else {}
                    else:
                        choice["text"] = event["text"]
                    yield sse({**chunk, "choices": [choice], **({"usage": None} if include_usage else {})})
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage})
            except APIError as e:  # the status line has gone: the error goes in the stream, as OpenAI's does
                yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
            finally:  # done, or the client went away (Starlette cancels the stream): free the rows either way
                cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts, finish = [""] * n_choices, [None] * n_choices
    try:
        while finished[0] < n_choices:
            try:  # wake up now and then to notice a client that went away, and free its rows
                event = account(await asyncio.wait_for(events.get(), timeout=1.0))
            except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody reads it
                continue
            texts[event["index"]] += event["text"]
            finish[event["index"]] = event["finish_reason"]
    finally:
        cancel()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
    return JSONResponse({**common, "choices": choices, "usage": usage})


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
