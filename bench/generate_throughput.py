"""Decode throughput and time to first token: ours beside LitGPT and transformers, same weights, same run.

    python bench/generate_throughput.py                         # BENCH.md's 51.75M Llama, batch 1 and 8
    python bench/generate_throughput.py --model smollm2         # the real SmolLM2-135M-Instruct (tests' GGUF cache)
    python bench/generate_throughput.py --precision bf16-true --device cuda
    python bench/generate_throughput.py --batch 1 --rounds 5 --reps 2    # on a noisy shared machine

Greedy decoding of 128 new tokens after a 64-token prompt of random ids, no stop token (every run makes all
128). Each implementation runs in its own process with 2 torch threads (LitGPT from .venv-peers), one warm-up
generation first; tokens/s = batch x new tokens / the median wall time of the timed generations; time to first
token = prefill + first sample. The weights are one set of tensors: ours, exported with convert/to_hf.py for
transformers and renamed to LitGPT's layout (fused qkv = cat(q, k, v)) for LitGPT.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
CACHE = ROOT / ".cache" / "bench-generate"
REFERENCE = dict(block_size=512, vocab_size=32000, n_layer=6, n_head=8, n_kv_head=8, n_embd=512,
                 intermediate_size=1376, norm_eps=1e-5)
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}


def prepare(model_name: str) -> tuple[Path, Path]:
    """Our checkpoint directory and its transformers export, built once."""
    sys.path.insert(0, str(ROOT))
    from checkpoint import save_checkpoint
    from convert import from_hf, to_hf
    from model import GPT, Config

    ours, hf = CACHE / model_name / "ours", CACHE / model_name / "hf"
    if model_name == "smollm2":
        hf = ROOT / ".cache" / "SmolLM2-135M-Instruct-hf"
        if not hf.is_dir():
            sys.exit(f"{hf}: not found; run `pytest -m real_model tests/test_real_model.py` once to build it")
        if not (ours / "model.safetensors").is_file():
            from_hf.convert(hf, out_dir=ours)
        return ours, hf
    if not (hf / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = Config(name="bench-51m", **REFERENCE)
        save_checkpoint(ours, config, GPT(config).state_dict())
        to_hf.convert(ours, out_dir=hf)
    return ours, hf


def litgpt_model(ours_dir: Path):
    import litgpt
    import yaml
    from safetensors.torch import load_file

    c = yaml.safe_load((ours_dir / "model_config.yaml").read_text())
    config = litgpt.Config(block_size=c["block_size"], vocab_size=c["vocab_size"], padded_vocab_size=c["vocab_size"],
                           n_layer=c["n_layer"], n_head=c["n_head"], n_query_groups=c["n_kv_head"],
                           n_embd=c["n_embd"], head_size=c["head_dim"], intermediate_size=c["intermediate_size"],
                           rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                           norm_eps=c["norm_eps"], mlp_class_name="LLaMAMLP", rope_base=int(c["rope_base"]),
                           )
    ours = load_file(ours_dir / "model.safetensors")
    state = {"transformer.wte.weight": ours["embed.weight"], "transformer.ln_f.weight": ours["norm.weight"],
             "lm_head.weight": ours.get("lm_head.weight", ours["embed.weight"])}
    for i in range(c["n_layer"]):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        state[q + "attn.qkv.weight"] = torch.cat([ours[p + f"attn.{x}_proj.weight"] for x in "qkv"])
        state[q + "attn.proj.weight"] = ours[p + "attn.o_proj.weight"]
        state[q + "norm_1.weight"] = ours[p + "attn_norm.weight"]
        state[q + "norm_2.weight"] = ours[p + "mlp_norm.weight"]
        for theirs, mine in (("fc_1", "gate_proj"), ("fc_2", "up_proj"), ("proj", "down_proj")):
            state[q + f"mlp.{theirs}.weight"] = ours[p + f"mlp.{mine}.weight"]
    model = litgpt.GPT(config)
    model.load_state_dict(state)
    return model


def measure(impl: str, ours_dir: Path, hf_dir: Path, batch: int, prompt_len: int, new_tokens: int, reps: int,
            precision: str, device: str) -> dict:
    torch.set_num_threads(2)
    dtype = DTYPES[precision]
    torch.manual_seed(1)
    prompts = torch.randint(0, 1000, (batch, prompt_len), device=device)

    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from checkpoint import load_model
        from generation import generate_tokens, use_decode_layout

        model = use_decode_layout(load_model(ours_dir, device=device, dtype=dtype).eval(), batch)  # as generate.py

        def run(n):
            return generate_tokens(model, prompts.tolist(), n, temperature=0)
    elif impl == "litgpt":
        from litgpt.generate.base import batched_generate_fn, generate_fn

        model = litgpt_model(ours_dir).to(device=device, dtype=dtype).eval()
        model.max_seq_length = prompt_len + new_tokens
        model.set_kv_cache(batch_size=batch, device=device, dtype=dtype)

        def run(n):
            if batch == 1:
                return generate_fn(model, prompts[0], prompt_len + n, temperature=0.0, include_prompt=False,
                                   include_eos=False)
            return batched_generate_fn(model, prompts, prompt_len + n, sample_args=dict(temperature=0.0),
                                       include_prompt=False, include_eos=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()

        def run(n):
            out = model.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            return iter(out[0, prompt_len:])

    def timed(n: int) -> tuple[float, float, int]:
        """Seconds to the first token, seconds for all, tokens per row."""
        with torch.inference_mode():
            start = time.perf_counter()
            first, count = None, 0
            for _ in run(n):
                count += 1
                first = first or time.perf_counter() - start
            return first, time.perf_counter() - start, count

    timed(new_tokens)  # warm-up: allocator, thread pool, lazily built tables
    runs = [timed(new_tokens) for _ in range(reps)]
    # transformers' generate returns at the end, so its first token is timed as a 1-token generation
    firsts = [timed(1)[1] for _ in range(reps)] if impl == "hf" else [r[0] for r in runs]
    assert all(r[2] == new_tokens for r in runs), f"{impl}: expected {new_tokens} tokens, got {[r[2] for r in runs]}"
    return dict(impl=impl, batch=batch, tokens_per_sec=batch * new_tokens / statistics.median(r[1] for r in runs),
                ttft_ms=1000 * statistics.median(firsts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["reference", "smollm2"], default="reference")
    parser.add_argument("--impl", choices=["ours", "litgpt", "hf"], help="measure one implementation, print JSON")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the implementations one after the other this many times and take medians: the "
                             "ratios of neighbouring runs, which a shared machine's slow spells disturb less")
    parser.add_argument("--precision", choices=list(DTYPES), default="32-true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ours_dir, hf_dir = prepare(args.model)
    if args.impl:
        for batch in args.batch:
            print(json.dumps(measure(args.impl, ours_dir, hf_dir, batch, args.prompt_len, args.new_tokens, args.reps,
                                     args.precision, args.device)))
        return

    print(f"{args.model}: greedy, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, {args.precision}, "
          f"{args.device}, 2 threads, median of {args.reps} after a warm-up"
          + (f"; medians over {args.rounds} rounds, ratios within each round" if args.rounds > 1 else ""))
    print(f"{'batch':<7}{'impl':<9}{'tokens/s':>10}{'first token':>13}{'vs LitGPT':>11}{'vs HF':>8}")
    for batch in args.batch:
        rounds = []  # per round: {impl: result}
        for _ in range(args.rounds):
            rows = {}
            for impl, python in (("ours", sys.executable), ("litgpt", str(PEER_PYTHON)), ("hf", sys.executable)):
                if impl == "litgpt" and not PEER_PYTHON.is_file():
                    continue
                cmd = [python, __file__, "--impl", impl, "--model", args.model, "--batch", str(batch),
                       "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens), "--reps",
                       str(args.reps), "--precision", args.precision, "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(f"{batch:<7}{impl:<9}  failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                    continue
                rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            rounds.append(rows)
        if not PEER_PYTHON.is_file():
            print(f"{batch:<7}{'litgpt':<9}  (no .venv-peers: see BENCH.md)")
        for impl in ("ours", "litgpt", "hf"):
            mine = [r for r in rounds if impl in r]
            if not mine:
                continue
            tps = statistics.median(r[impl]["tokens_per_sec"] for r in mine)
            ttft = statistics.median(r[impl]["ttft_ms"] for r in mine)
            ratios = {p: [r[impl]["tokens_per_sec"] / r[p]["tokens_per_sec"] for r in mine if p in r]
                      for p in ("litgpt", "hf")}
            vs = [statistics.median(ratios[p]) if ratios[p] else float("nan") for p in ("litgpt", "hf")]
            per_round = ("  rounds vs LitGPT: " + ", ".join(f"{x:.2f}" for x in ratios["litgpt"])
                         if impl == "ours" and len(ratios["litgpt"]) > 1 else "")
            print(f"{batch:<7}{impl:<9}{tps:>10.1f}{ttft:>10.0f} ms{vs[0]:>10.2f}x{vs[1]:>7.2f}x{per_round}")


if __name__ == "__main__":
    main()
