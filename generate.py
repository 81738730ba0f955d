"""Sample from a checkpoint directory, or chat with it.

    python generate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Hello, my name is"
    python generate.py --checkpoint_dir DIR --prompt "..." --temperature 0            # greedy
    python generate.py --checkpoint_dir DIR --prompts_file prompts.txt --num_samples 2  # one batch, JSONL out
    python generate.py --checkpoint_dir DIR --chat true   # multi-turn, /reset /exit
    echo "What is the capital of France?" | python generate.py --checkpoint_dir DIR --chat true --temperature 0
    python generate.py --checkpoint_dir DIR --precision bf16-true --quantize bnb.nf4 --device cuda
    python generate.py --lora_dir out/lora/final --prompt "..."                        # base + unmerged adapter

Generation stops at any of the tokenizer's end tokens (generation_config.json may list several: Llama 3's
<|eot_id|> ends a chat turn), at a --stop string, or after --max_new_tokens.
"""

import json
import sys
import time
from argparse import ArgumentError
from pathlib import Path

import torch
from jsonargparse import CLI

from checkpoint import load_model, require, weights_dtype
from model import InputError
from generation import generate, generate_tokens, use_decode_layout
from tokenizer import Tokenizer

# For base models without a chat template: a plain transcript, and the turn marker that ends a reply.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")
PLAIN_CHAT_STOP = "\nUser:"


def main(
    checkpoint_dir: Path | None = None,
    *,
    prompt: str = "The meaning of life is",
    prompts_file: Path | None = None,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    num_samples: int = 1,
    seed: int = 1234,
    precision: str = "32-true",
    quantize: str | None = None,
    device: str = "auto",
    compile: bool = False,
    lora_dir: Path | None = None,
    max_seq_length: int = 2048,
) -> None:
    """Generate text with a checkpoint directory.

    Args:
        checkpoint_dir: the model (model.safetensors, model_config.yaml, tokenizer files). Optional with --lora_dir,
            whose lora_config.yaml names its base.
        prompt: the text to continue (used as is: no chat template; --chat applies it).
        prompts_file: one prompt per line, generated as one batch; prints one JSON object per completion.
        chat: interactive multi-turn chat with the model's own chat template (a plain one for base models).
            Reads turns from stdin when it is not a terminal.
        max_new_tokens: most tokens to generate per completion (per turn in chat).
        temperature: 0 is greedy; higher is more random.
        top_k: sample among the k most likely tokens only (None: all).
        top_p: nucleus sampling: among the fewest tokens whose probability reaches top_p (1.0: all).
        stop: strings that end a completion (cut before them), besides the tokenizer's end tokens.
        num_samples: completions per prompt, generated in one batch.
        seed: seed of the sampling generator, so a run can be repeated exactly.
        precision: 32-true, bf16-true or 16-true: the dtype of the weights and activations.
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8: quantise the linear layers with
            bitsandbytes (4-bit modes run on CPU too).
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        compile: torch.compile the model for the decode step.
        lora_dir: a LoRA run's adapter directory, loaded on top of its base checkpoint.
        max_seq_length: KV-cache length in chat mode (prompt, history and replies); capped at block_size.
    """
    dtype = weights_dtype(precision, allowed=("32-true", "bf16-true", "16-true"))
    if quantize is not None:
        from quantize import MODES  # bitsandbytes loads only when asked for

        if quantize not in MODES:
            raise InputError(f"--quantize {quantize!r}: expected one of {', '.join(MODES)}")
    if checkpoint_dir is None and lora_dir is None:
        raise InputError("--checkpoint_dir: required (or --lora_dir, whose config names its base)")
    require(max_new_tokens >= 1, "--max_new_tokens", max_new_tokens, "a positive integer")
    # a negative temperature flips the distribution: it would sample the least likely tokens
    require(temperature >= 0, "--temperature", temperature, "0 (greedy) or more")
    require(top_k is None or top_k >= 1, "--top_k", top_k, "a positive integer or null (all tokens)")
    require(0 < top_p <= 1, "--top_p", top_p, "a probability in (0, 1]")
    require(num_samples >= 1, "--num_samples", num_samples, "a positive integer")
    require(max_seq_length >= 2, "--max_seq_length", max_seq_length, "at least 2 tokens")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    model, tokenizer_dir = load(checkpoint_dir, lora_dir, device, dtype, quantize)
    prompts = None if chat else [prompt] if prompts_file is None else read_prompts(prompts_file)
    use_decode_layout(model, 1 if chat else len(prompts) * num_samples)  # laid out for the batch it decodes
    tokenizer = Tokenizer(tokenizer_dir)
    if compile:
        # The blocks, not the whole forward: it reads the cache length as a Python int (a graph break), and the
        # blocks see a growing number of cached keys, hence dynamic shapes.
        for block in model.layers:
            block.compile(dynamic=True)
    generator = torch.Generator(device).manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    if chat:
        return chat_loop(model, tokenizer, max_new_tokens, stop or [], min(max_seq_length, model.config.block_size),
                         sampling)
    batch = [tokenizer.encode(p) for p in prompts for _ in range(num_samples)]
    stream = len(batch) == 1 and sys.stdout.isatty()
    printer = StreamPrinter(stop or []) if stream else None
    start = time.perf_counter()
    outputs = generate(model, batch, max_new_tokens, stop_ids=tokenizer.stop_ids,
                       on_token=stop_checker(tokenizer, batch, stop or [], printer), **sampling)
    elapsed = time.perf_counter() - start
    texts = [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop or []) for ids in outputs]
    if stream:
        printer.finish(texts[0])
    elif prompts_file is None:
        print(("\n\n" + "-" * 40 + "\n\n").join(prompts[0] + t for t in texts))
    else:
        for i, text in enumerate(texts):
            print(json.dumps({"prompt": prompts[i // num_samples], "sample": i % num_samples, "completion": text},
                             ensure_ascii=False))
    n_tokens = sum(len(o) for o in outputs)
    print(f"{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s "
          f"(batch {len(batch)}, {precision}{', ' + quantize if quantize else ''})", file=sys.stderr)


def load(checkpoint_dir, lora_dir, device, dtype, quantize):
    """The model in eval mode on device, and the directory of its tokenizer."""
    if lora_dir is not None:
        from checkpoint import load_lora_model

        model, base_dir = load_lora_model(lora_dir, base_dir=checkpoint_dir, device=device, dtype=dtype,
                                          quantize=quantize)
        return model.eval(), base_dir if not (Path(lora_dir) / "tokenizer.json").is_file() else lora_dir
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize, compute_dtype=dtype)
    return model.eval(), checkpoint_dir


def chat_loop(model, tokenizer, max_new_tokens, stop, max_seq_length, sampling):
    """Multi-turn chat. The KV cache persists across turns: each turn renders the whole conversation with
    the template, and only the tokens after the longest prefix already in the cache are computed."""
    template = tokenizer.chat_template
    if template is None:
        print("(no chat template in the tokenizer files: using a plain 'User: / Assistant:' transcript)",
              file=sys.stderr)
        stop = [*stop, PLAIN_CHAT_STOP]
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting; /reset starts over, /exit quits.", file=sys.stderr)
    messages, in_cache = [], []
    while True:
        try:
            user = input(">> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and user == "":
            break  # end of stdin
        user = user.strip()
        if user == "/exit":
            break
        if user == "/reset":
            messages, in_cache = [], []
            model.clear_kv_cache()
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        ids = render_chat(tokenizer, messages, template)
        while len(ids) + 1 > max_seq_length and len(messages) > 1:
            messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
            ids = render_chat(tokenizer, messages, template)  # oldest exchange dropped to fit the cache
        reuse = common_prefix(in_cache, ids) if model.layers[0].attn.kv_cache is not None else 0
        printer = StreamPrinter(stop) if interactive else None
        reply = []
        for token in generate_tokens(model, [ids], max_new_tokens, stop_ids=tokenizer.stop_ids,
                                     max_seq_length=max_seq_length, cached_prefix=reuse, **sampling):
            token = int(token[0])
            if token in tokenizer.stop_ids:
                break
            reply.append(token)
            text = tokenizer.decode(reply, skip_special_tokens=True)
            if printer is not None:
                printer.update(text)
            if any(s in text for s in stop):
                break
        # The cache holds the prompt and every reply token but the last, which was sampled and not fed.
        in_cache = (ids + reply)[:len(ids) + max(len(reply) - 1, 0)]
        text = cut_at_stop(tokenizer.decode(reply, skip_special_tokens=True), stop)
        if printer is not None:
            printer.finish(text)
        else:
            print(text, flush=True)
        messages.append({"role": "assistant", "content": text.strip() if template is None else text})


def render_chat(tokenizer, messages, template):
    if template is None:
        from tokenizer import compile_template

        return tokenizer.encode(compile_template(PLAIN_CHAT_TEMPLATE).render(messages=messages,
                                                                             add_generation_prompt=True))
    # The template writes the special tokens itself (bos included), as transformers' apply_chat_template does.
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=False, eos=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_prompts(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise InputError(f"--prompts_file {path}: not found")
    prompts = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts_file {path}: no prompts (one per line)")
    return prompts


def stop_checker(tokenizer, batch, stop, printer):
    """on_token callback: stream row 0 when printing to a terminal; end a row once a stop string appears."""
    if not stop and printer is None:
        return None
    generated = [[] for _ in batch]

    def on_token(row: int, token: int) -> bool:
        generated[row].append(token)
        text = tokenizer.decode(generated[row], skip_special_tokens=True)
        if printer is not None:
            printer.update(text)
        return any(s in text for s in stop)

    return on_token


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


class StreamPrinter:
    """Prints a growing completion as it is produced. Decoding the whole reply each time (not token by
    token) keeps multi-byte characters split across tokens intact: an incomplete one is held back, and so
    are the last characters that could still turn out to start a stop string."""

    def __init__(self, stop: list[str]):
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.printed = ""

    def update(self, text: str) -> None:
        text = text.rstrip("\ufffd")
        text = text[:len(text) - self.hold]
        if text.startswith(self.printed) and len(text) > len(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def finish(self, text: str) -> None:
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="")
        print(flush=True)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
