"""The measurements of the GPU proof (bench/gpu.sh runs them, one part per call): each part writes its figures to
OUT/parts/PART.json as it goes, `report` gathers them into OUT/gpu.json and OUT/gpu.md.

    python bench/gpu_bench.py pretrain --out DIR   # TinyLlama-1.1B, seq 2048, bf16-mixed, compiled: tokens/s, MFU
    python bench/gpu_bench.py decode --out DIR     # Llama-3.2-1B, bf16, batch 1 and 8, eager and compiled
    python bench/gpu_bench.py memory --out DIR     # peak memory: QLoRA nf4 of Llama-3.1-8B, full finetune SmolLM2-360M
    python bench/gpu_bench.py packing --out DIR    # packed rows: FlexAttention against the dense mask (issue 18)
    python bench/gpu_bench.py report --out DIR     # gpu.json + gpu.md from the parts' files
    GPU_SH_DRY=1 python bench/gpu_bench.py ...     # CPU, toy sizes, seconds: the same code, for tests of the plumbing

Every model is a preset of model.py with random weights: nothing is downloaded. Each figure beside LitGPT's on the
same config in the same run (BENCH.md), LitGPT from .venv-peers in its own process; without that venv, or when the
peer fails, only the peer's column is empty. This file runs in both venvs: the peer's code paths import nothing of
ours but bench/generate_throughput.py (torch, yaml, safetensors), so keep project imports inside our functions.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
DRY = os.environ.get("GPU_SH_DRY") == "1"
# GPU_SH_DRY: the same code on the CPU at toy sizes; compile through dynamo only (backend "eager"), so the graph
# capture is exercised without a C++ toolchain or minutes of inductor code generation on 2 cores
DEVICE = "cpu" if DRY else "cuda"
COMPILE_BACKEND = "eager" if DRY else "inductor"
# vocab 1024: bench/generate_throughput.py draws prompt ids below 1000
TOY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, intermediate_size=128, vocab_size=1024,
           block_size=64)
PRESETS = dict(pretrain="TinyLlama-1.1B-intermediate-step-1431k-3T", decode="Llama-3.2-1B",
               qlora="Llama-3.1-8B", full="SmolLM2-360M", packing="SmolLM2-360M")
# HBM bandwidth (bytes/s) from NVIDIA's data sheets; the first name contained in the device's name wins
GPU_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12,
                 "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12}
# Published figures the markdown quotes beside ours (same kind of run, not the same machine)
ANCHORS = dict(
    pretrain="TinyLlama paper (arXiv:2401.02385): 56% MFU on A100-40G; torchtitan: ~39% MFU for Llama-3.1-8B on H100",
    decode="gpt-fast: Llama-2-7B bf16 104.9 tok/s at batch 1 on A100-80GB, ~70% of HBM bandwidth",
    qlora="torchtune: Llama-3.1-8B QLoRA single device 7.4 GiB peak (its recipe checkpoints activations)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["pretrain", "decode", "memory", "packing", "report", "train-impl",
                                         "decode-peer"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-results")
    # train-impl / decode-peer: one implementation in its own process (the peer's from .venv-peers), JSON on stdout
    parser.add_argument("--impl", choices=["ours", "litgpt"], default="ours")
    parser.add_argument("--config_json", help="our Config as a dict: the shape both implementations build")
    parser.add_argument("--ckpt", type=Path, help="decode-peer: our checkpoint directory")
    args = parser.parse_args()
    if args.part in ("pretrain", "decode", "memory", "packing"):
        forced_failure(args.part)
        if not DRY:
            require_cuda()
    if args.part == "train-impl":
        print(json.dumps(train_throughput(args.impl, json.loads(args.config_json))))
        return
    if args.part == "decode-peer":
        print(json.dumps(decode_peer(args.ckpt)))
        return
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    dict(pretrain=pretrain, decode=decode, memory=memory, packing=packing, report=report)[args.part](args.out)


def forced_failure(part: str) -> None:
    """GPU_SH_FAIL / GPU_SH_HANG name parts that fail or never finish: how tests/test_gpu_sh.py checks that a failed
    or timed-out part is recorded as such while the others still run."""
    if part in os.environ.get("GPU_SH_FAIL", "").split():
        raise RuntimeError(f"GPU_SH_FAIL={os.environ['GPU_SH_FAIL']}: {part} fails on purpose")
    if part in os.environ.get("GPU_SH_HANG", "").split():
        print(f"GPU_SH_HANG: {part} sleeps until its time limit", flush=True)
        time.sleep(10**6)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(f"CUDA is not available to torch {torch.__version__} (built for CUDA {torch.version.cuda}): "
                 "a CPU wheel, or a driver older than the wheel's CUDA; see logs/install.log and nvidia-smi")


class Part:
    """The figures of one part, rewritten to OUT/parts/NAME.json after every measurement, so a part stopped by
    its time limit still leaves what it had measured."""

    def __init__(self, out: Path, name: str, **info):
        self.path = out / "parts" / f"{name}.json"
        self.data = dict(part=name, dry=DRY, device=device_name(), **info, results={}, errors={})
        self.save()

    def measure(self, key: str, fn, *args, **kwargs) -> dict | None:
        """fn's dict under results[key], or its error under errors[key]: one failure never stops the part."""
        print(f"{self.data['part']}: {key} ...", flush=True)
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (recorded, and the next measurement runs)
            traceback.print_exc()
            last = (str(e).strip().splitlines() or [""])[-1]
            self.data["errors"][key] = f"{type(e).__name__}: {last}"
            self.save()
            return None
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{self.data['part']}: {key}: {json.dumps(result)}", flush=True)
        self.data["results"][key] = result
        self.save()
        return result

    def finish(self) -> None:
        """Exit 1 when one of our measurements failed (gpu.sh then records the part as failed); the peer's failures
        only empty its column."""
        if ours := [k for k in self.data["errors"] if not k.startswith("litgpt")]:
            sys.exit(f"{self.data['part']}: failed: {', '.join(ours)}")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def device_name() -> str:
    if DEVICE == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, dry run)" if DRY else "no CUDA device"


def preset(name: str) -> dict:
    """A preset's Config as a plain dict (head_dim, n_kv_head filled in); toy sizes in a dry run."""
    sys.path.insert(0, str(ROOT))
    from model import Config
    return Config.from_name(name, **(TOY if DRY else {})).to_dict()


def run_peer(args: list[str], timeout: float) -> dict:
    """One of this file's subcommands in .venv-peers; its last stdout line is its JSON."""
    if os.environ.get("GPU_SH_PEERS", "1") == "0":
        raise RuntimeError("no LitGPT: GPU_SH_PEERS=0")
    done = os.environ.get("GPU_SH_PEERS_DONE")  # gpu.sh installs the peer while the CUDA tests run
    deadline = time.monotonic() + timeout
    while done and not Path(done).is_file() and time.monotonic() < deadline:
        time.sleep(1)
    if done and Path(done).is_file() and Path(done).read_text().strip() != "0":
        raise RuntimeError(f"no LitGPT: its install failed (exit {Path(done).read_text().strip()}; "
                           "see logs/peers_install.log)")
    if not PEER_PYTHON.is_file():
        raise RuntimeError("no LitGPT: .venv-peers is missing (see BENCH.md)")
    return run_json([str(PEER_PYTHON), __file__, *args], timeout)


def run_json(cmd: list[str], timeout: float) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    sys.stderr.write(out.stderr[-5000:])
    if out.returncode:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
        raise RuntimeError(f"{Path(cmd[0]).parent.parent.name}: exit {out.returncode}: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- 2. pretraining

def pretrain(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from model import GPT, Config
    from training import cpu_nominal_flops, device_peak_flops, flops_per_token_of

    c = preset(PRESETS["pretrain"])
    config = Config(**c)
    with torch.device("meta"):
        model = GPT(config)
    flops_per_token = flops_per_token_of(model, config, config.block_size)
    # the GPU's data-sheet bf16 peak; a dry run takes the CPU's nominal one, since timing a bf16 matmul there can take
    # minutes on a CPU without AVX512-BF16
    peak, peak_source = cpu_nominal_flops(half=True) if DRY else device_peak_flops(torch.device(DEVICE), "bf16-mixed")
    part = Part(out, "pretrain", model=c["name"], seq_len=config.block_size, precision="bf16-mixed",
                compile=COMPILE_BACKEND, activation_checkpointing=False, flops_per_token=flops_per_token,
                peak_flops=peak, peak_source=peak_source, anchor=ANCHORS["pretrain"],
                params=sum(p.numel() for p in model.parameters()))

    def with_mfu(result: dict) -> dict:
        result["mfu"] = result["tokens_per_sec"] * flops_per_token / peak if peak else None
        return result

    # each in a fresh process: a clean GPU for its own batch-size probe, and the peer in its venv
    cmd = [__file__, "train-impl", "--config_json", json.dumps(c)]
    part.measure("ours", lambda: with_mfu(run_json([sys.executable, *cmd, "--impl", "ours"], timeout=600)))
    part.measure("litgpt", lambda: with_mfu(run_peer(cmd[1:] + ["--impl", "litgpt"], timeout=600)))
    part.finish()


def train_throughput(impl: str, c: dict) -> dict:
    """Median tokens/s of training steps (forward, loss, backward, AdamW) as each implementation's pretrain script
    takes them, bf16 autocast, compiled, at the largest power-of-two micro batch that fits (at most 64)."""
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    T = c["block_size"]
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from model import GPT, Config
        from training import make_optimizer
        with device:
            model = GPT(Config(**c))
        optimizer = make_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device)  # fused AdamW, as pretrain.py
        # pretrain.py: full blocks, the summed cross entropy over the token count
        loss_of = lambda forward, x, y: forward(x, targets=y) / y.numel()  # noqa: E731
    else:
        import litgpt
        from litgpt.utils import chunked_cross_entropy
        with device:
            model = litgpt.GPT(litgpt_config(c))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                      fused=device.type == "cuda")  # as LitGPT's pretrain (fused on CUDA only)
        loss_of = lambda forward, x, y: chunked_cross_entropy(forward(x), y)  # noqa: E731

    def step(forward, batch_size: int) -> None:
        x = torch.randint(0, c["vocab_size"], (batch_size, T + 1), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):  # Fabric's bf16-mixed
            loss = loss_of(forward, x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batch_size = fit_micro_batch(lambda b: step(model, b)) if device.type == "cuda" else 2
    forward = torch.compile(model, backend=COMPILE_BACKEND)
    warmup, steps = (1, 2) if DRY else (3, 10)
    while True:
        try:
            times = []
            for i in range(warmup + steps):
                sync()
                start = time.perf_counter()
                step(forward, batch_size)
                sync()
                times.append(time.perf_counter() - start)
            break
        except torch.OutOfMemoryError:  # compiled kernels can need more than eager's probe said
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
    median = statistics.median(times[warmup:])
    return dict(micro_batch=batch_size, tokens_per_sec=batch_size * T / median, step_ms=1000 * median,
                first_step_s=times[0], peak_gib=peak_gib(), torch=torch.__version__, **impl_version(impl))


def fit_micro_batch(step, most: int = 64) -> int:
    """Eager steps at micro batch 1 and 2 give the memory a sample adds and what stays (weights, gradients,
    optimizer states); the largest power of two that fits in 85% of the device, compiled code needing no more
    than eager does (the compiled run halves it on an out-of-memory error all the same)."""
    peaks = []
    for batch_size in (1, 1, 2):  # the first allocates the optimizer states
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step(batch_size)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    per_sample = max(peaks[2] - peaks[1], 1)
    fixed = peaks[1] - per_sample
    total = torch.cuda.get_device_properties(0).total_memory
    batch_size = 1
    while batch_size * 2 <= most and fixed + per_sample * batch_size * 2 <= 0.85 * total:
        batch_size *= 2
    return batch_size


def litgpt_config(c: dict):
    """LitGPT's Config for our Llama-shaped Config dict (as bench/generate_throughput.litgpt_model builds it)."""
    import litgpt
    return litgpt.Config(block_size=c["block_size"], vocab_size=c["vocab_size"], padded_vocab_size=c["vocab_size"],
                         n_layer=c["n_layer"], n_head=c["n_head"], n_query_groups=c["n_kv_head"], n_embd=c["n_embd"],
                         head_size=c["head_dim"], intermediate_size=c["intermediate_size"], rotary_percentage=1.0,
                         parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=c["norm_eps"],
                         mlp_class_name="LLaMAMLP", rope_base=int(c["rope_base"]))


def impl_version(impl: str) -> dict:
    if impl == "litgpt":
        from importlib.metadata import version
        return dict(litgpt=version("litgpt"))
    return {}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


# ------------------------------------------------------------------------------------------------------- 3. decoding

def decode(out: Path) -> None:
    """bench/generate_throughput.py's measure(), on a Llama-3.2-1B-shaped checkpoint of random bf16 weights:
    greedy, 64-token prompt + 128 new tokens, median of 3 after a warm-up (which absorbs compilation)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import generate_throughput as gt
    import generation
    from checkpoint import save_checkpoint
    from model import GPT, Config

    c = preset(PRESETS["decode"])
    prompt_len, new_tokens, reps = (8, 8, 1) if DRY else (64, 128, 3)
    ckpt = Path(tempfile.mkdtemp(prefix="gpu-decode-")) / "ckpt"  # GBs: not under OUT, which comes back
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(Config(**c)).to(torch.bfloat16)
    # the bytes every decode step reads (gpt-fast's model size: every parameter once; a tied head is the embedding)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    save_checkpoint(ckpt, Config(**c), model.state_dict())
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    name = device_name()
    bandwidth = next((v for k, v in GPU_BANDWIDTH.items() if k in name), None)
    part = Part(out, "decode", model=c["name"], precision="bf16-true", prompt_len=prompt_len, new_tokens=new_tokens,
                weight_bytes=weight_bytes, bandwidth=bandwidth, anchor=ANCHORS["decode"])

    def compiled_decode_layout(model, rows=1):
        """generate.py --compile: the decode layout, then each block compiled with dynamic shapes."""
        model = use_decode_layout(model, rows)
        for block in model.layers:
            block.compile(dynamic=True, backend=COMPILE_BACKEND)
        return model

    def ours(batch: int, compile: bool) -> dict:
        # measure() imports use_decode_layout from generation when it runs: swapping it in there compiles the model
        # that measure() builds, exactly as generate.py does, without a second copy of the measurement
        layout = compiled_decode_layout if compile else use_decode_layout
        with mock.patch.object(generation, "use_decode_layout", layout):
            r = gt.measure("ours", ckpt, None, batch, prompt_len, new_tokens, reps, "bf16-true", DEVICE)
        return with_bandwidth(r)

    def with_bandwidth(r: dict) -> dict:
        # each decode step reads the weights once for the whole batch: steps/s = tokens/s / batch
        r["hbm_share"] = weight_bytes * r["tokens_per_sec"] / r["batch"] / bandwidth if bandwidth else None
        return r

    use_decode_layout = generation.use_decode_layout
    # eager and the peer first, compilation (the slowest to start) last: a part that runs out of time keeps the most
    for batch in (1, 8):
        part.measure(f"ours/b{batch}", ours, batch, False)
    part.measure("litgpt", lambda: dict(rows=run_peer(["decode-peer", "--ckpt", str(ckpt)], timeout=300)))
    peer = part.data["results"].pop("litgpt", None)
    if peer:  # the peer's process measures both batches: file each row beside ours
        for r in peer["rows"]:
            part.data["results"][f"litgpt/b{r['batch']}"] = with_bandwidth(r)
        part.save()
    for batch in (1, 8):
        part.measure(f"ours+compile/b{batch}", ours, batch, True)
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    part.finish()


def decode_peer(ckpt: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    import generate_throughput as gt
    prompt_len, new_tokens, reps = (8, 8, 1) if DRY else (64, 128, 3)
    return [dict(gt.measure("litgpt", ckpt, None, batch, prompt_len, new_tokens, reps, "bf16-true", DEVICE),
                 **impl_version("litgpt")) for batch in (1, 8)]


# --------------------------------------------------------------------------------------------------------- 4. memory

def memory(out: Path) -> None:
    """Peak memory of finetuning steps, set up as finetune_lora.py / finetune_full.py set them up (Fabric, our
    precision plugin, add_lora, make_optimizer), on random weights and random tokens: every token a target."""
    seq_len = TOY["block_size"] if DRY else 2048
    part = Part(out, "memory", seq_len=seq_len, micro_batch=1, anchor=ANCHORS["qlora"])
    part.measure("qlora-nf4", qlora_peak, seq_len)
    part.measure("full-bf16-mixed", full_peak, seq_len)
    part.finish()


def qlora_peak(seq_len: int) -> dict:
    """QLoRA of a Llama-3.1-8B shape: built on the meta device, each projection made in bf16 on the GPU and packed to
    nf4 at once (one float weight at a time, never the float model), the rest materialised in bf16; LoRA r 8 on
    every projection (float32 adapters); bf16-true, as finetune_lora.py's QLoRA command. Peaks without and with
    activation checkpointing (torchtune's 7.4 GiB recipe checkpoints)."""
    sys.path.insert(0, str(ROOT))
    import torch.nn as nn
    from model import GPT, Block, Config, LoRAConfig, add_lora
    from quantize import PROJECTIONS, quantized_linear

    c = preset(PRESETS["qlora"])
    device, dtype = torch.device(DEVICE), torch.bfloat16
    reset_peak()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(Config(**c))
    for owner in [m for m in model.modules() if type(m) in PROJECTIONS]:
        for name in PROJECTIONS[type(owner)]:
            meta = getattr(owner, name)
            linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device=device,
                               dtype=dtype)
            nn.init.normal_(linear.weight, std=0.02)
            setattr(owner, name, quantized_linear(linear, "bnb.nf4", compute_dtype=dtype, device=device))
    for module in model.modules():  # embedding, head, norms: still on meta
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                data = torch.empty_like(p, device=device, dtype=dtype)
                if p.dim() == 2:
                    nn.init.normal_(data, std=0.02)
                else:
                    nn.init.ones_(data)
                setattr(module, name, nn.Parameter(data, requires_grad=p.requires_grad))
    model.init_rope_cache(device)
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")))
    built = peak_gib()
    result = train_peaks(model, "bf16-true", c["vocab_size"], seq_len, Block)
    return dict(model=c["name"], quantize="bnb.nf4", lora_r=8, precision="bf16-true", build_peak_gib=built,
                **result)


def full_peak(seq_len: int) -> dict:
    """Full finetuning of a SmolLM2-360M shape in bf16-mixed: float32 weights, fused AdamW, bf16 autocast."""
    sys.path.insert(0, str(ROOT))
    from model import GPT, Block, Config

    c = preset(PRESETS["full"])
    reset_peak()
    torch.manual_seed(0)
    model = GPT(Config(**c))  # on the CPU first, as finetune_full.py: Fabric moves it
    result = train_peaks(model, "bf16-mixed", c["vocab_size"], seq_len, Block, checkpointed=False)
    return dict(model=c["name"], precision="bf16-mixed", **result)


def train_peaks(model, precision: str, vocab_size: int, seq_len: int, block_cls, checkpointed: bool = True) -> dict:
    """Peak memory (GiB on CUDA; the process's peak RSS in MB on the CPU) over finetuning steps of micro batch 1,
    as the scripts take them; then again with activation checkpointing of every Block when `checkpointed`."""
    import lightning as L
    from training import make_optimizer, precision_args

    fabric = L.Fabric(accelerator=DEVICE, devices=1, **precision_args(precision))
    model = fabric.setup_module(model)
    raw_model = model.module
    optimizer = fabric.setup_optimizers(make_optimizer(raw_model, 1e-4, 0.0, (0.9, 0.95), fabric.device))
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    steps = 2 if DRY else 3
    losses = []

    def run() -> float | None:
        reset_peak()
        for _ in range(steps):
            x = torch.randint(0, vocab_size, (1, seq_len + 1), device=fabric.device)
            # the scripts' loss: summed cross entropy over the number of target tokens of the step
            loss = model(x[:, :-1], targets=x[:, 1:]) / seq_len
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return peak_gib()

    result = dict(trainable_params=trainable, peak_gib=run())
    if checkpointed:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(raw_model, check_fn=lambda m: isinstance(m, block_cls))
        result["peak_gib_checkpointed"] = run()
    result["losses"] = losses
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -------------------------------------------------------------------------------------------------------- 5. packing

def packing(out: Path) -> None:
    """Training steps (forward, backward, bf16 autocast) on packed rows of Alpaca-like documents, with each
    document-attention backend of model.py: FlexAttention (block-sparse, compiled), the dense block-diagonal SDPA
    mask, and a document at a time (varlen); plain causal attention over the same rows (one long document each: no
    masking at all) as the ceiling. Tokens/s, step time and peak memory of each."""
    sys.path.insert(0, str(ROOT))
    from model import GPT, Config

    c = preset(PRESETS["packing"])
    T, batch = (TOY["block_size"], 2) if DRY else (8192, 2)
    c["block_size"] = T
    lengths = packed_lengths(T, batch, median=16 if DRY else 180)
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths], device=DEVICE)
    part = Part(out, "packing", model=c["name"], seq_len=T, micro_batch=batch, precision="bf16-mixed",
                documents=sum(map(len, lengths)), mean_document=T * batch / sum(map(len, lengths)))
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(Config(**c))
    idx = torch.randint(0, c["vocab_size"], (batch, T + 1), device=DEVICE)
    warmup, steps = (1, 2) if DRY else (2, 6)

    def step_time(backend: str | None) -> dict:
        model.document_attention = backend or "auto"
        ids = doc_ids if backend else None
        reset_peak()
        times = []
        for _ in range(warmup + steps):
            sync()
            start = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model(idx[:, :-1], targets=idx[:, 1:], doc_ids=ids) / T
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
        median = statistics.median(times[warmup:])
        return dict(tokens_per_sec=batch * T / median, step_ms=1000 * median, first_step_s=times[0],
                    peak_gib=peak_gib())

    # left out: on the CPU (the dry run) FlexAttention, which has no backward there; on a GPU varlen, a Python loop
    # over the documents that "auto" never picks there (0.50x the dense mask's tokens/s on an H200, 15 s of the part)
    skip = dict(flex="FlexAttention has no backward on the CPU") if DEVICE == "cpu" else dict(
        varlen="a Python loop over documents, never the CUDA choice: left out for time")
    part.data["skipped"] = skip
    for backend in ("flex", "sdpa", "varlen", None):
        if backend not in skip:
            part.measure(backend or "causal", step_time, backend)
    part.finish()


def packed_lengths(T: int, rows: int, median: float) -> list[list[int]]:
    """Document lengths of packed rows: lognormal (sigma 0.8) around `median` tokens, as Alpaca's examples are in
    tokens, laid end to end; the last document of a row cut at the row's end."""
    rng = random.Random(0)
    out = []
    for _ in range(rows):
        row, left = [], T
        while left:
            n = min(left, max(8, round(rng.lognormvariate(math.log(median), 0.8))))
            row.append(n)
            left -= n
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------------- report

PART_TITLES = dict(install="install", cuda_tests="1. CUDA tests", pretrain="2. pretraining throughput",
                   decode="3. decoding", memory="4. memory", packing="5. packing")


def report(out: Path) -> None:
    """OUT/gpu.json (everything) and OUT/gpu.md (the summary for bench/RESULTS.md) from the parts' files."""
    parts = {}
    for name in PART_TITLES:
        status_file, data_file = out / "parts" / f"{name}.status", out / "parts" / f"{name}.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else None
        data = json.loads(data_file.read_text()) if data_file.is_file() else {}
        if name == "cuda_tests":
            data = junit_summary(out / "cuda-tests.xml")
        if status is None:
            state = "not run"
        elif status.get("skipped"):
            state = f"skipped ({status['skipped']})"
        elif status["rc"] in (124, 137):
            state = "timed out"
        else:
            # a missing or failed peer empties its column only: the part is ours
            ours_errors = [k for k in data.get("errors", {}) if not k.startswith("litgpt")]
            state = "ok" if status["rc"] == 0 and not ours_errors and not data.get("failed") else "failed"
        parts[name] = dict(status=state, **(status or {}), **data)
    doc = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), dry=DRY, env=environment(), parts=parts)
    (out / "gpu.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "gpu.md").write_text(md)
    print(md)


def environment() -> dict:
    env = dict(device=device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), python=platform.python_version())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   gpu_count=torch.cuda.device_count())
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    from importlib.metadata import PackageNotFoundError, version
    for package in ("bitsandbytes", "lightning"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def junit_summary(path: Path) -> dict:
    """Counts and the names of failed and skipped tests from pytest's --junitxml."""
    if not path.is_file():
        return dict(failed=[], passed=[], skipped=[], errors={"cuda_tests": "no junit xml: pytest did not finish"})
    import xml.etree.ElementTree as ET
    passed, failed, skipped = [], [], []
    for case in ET.parse(path).iter("testcase"):
        name = case.get("name")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            failed.append(dict(test=name, message=((bad.get("message") or "").splitlines() or [""])[0][:300]))
        elif skip is not None:
            skipped.append(dict(test=name, reason=(skip.get("message") or "")[:300]))
        else:
            passed.append(dict(test=name, seconds=float(case.get("time") or 0)))
    return dict(passed=passed, failed=failed, skipped=skipped)


def markdown(doc: dict) -> str:
    env, parts = doc["env"], doc["parts"]
    lines = [f"### GPU proof ({doc['date'][:10]}): {env['device']}" + (" — DRY RUN, toy sizes" if doc["dry"] else ""),
             f"torch {env['torch']}, CUDA {env['cuda']}, driver {env.get('driver')}, bitsandbytes "
             f"{env.get('bitsandbytes')}; `bash bench/gpu.sh`",
             "", "| part | status | seconds |", "|---|---|---|"]
    for name, title in PART_TITLES.items():
        p = parts[name]
        lines.append(f"| {title} | {p['status']} | {p.get('seconds', '')} |")
    if not env["cuda_available"] and not doc["dry"]:
        lines += ["", "**CUDA is not available to torch: every GPU figure below is missing.**"]

    t = parts["cuda_tests"]
    lines += ["", f"#### 1. CUDA tests (`pytest -m cuda tests/test_cuda.py`): {len(t.get('passed', []))} passed, "
                  f"{len(t.get('failed', []))} failed, {len(t.get('skipped', []))} skipped"]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in t.get("failed", [])]
    lines += [f"- skipped {s['test']}: {s['reason']}" for s in t.get("skipped", [])][:3 if doc["dry"] else None]

    p = parts["pretrain"]
    lines += ["", f"#### 2. Pretraining throughput: {p.get('model')}, random weights, seq {p.get('seq_len')}, "
                  f"bf16-mixed, compiled ({p.get('compile')}), no activation checkpointing",
              f"{fmt(p.get('flops_per_token'), 3, 1e9)} GFLOP/token; MFU against {fmt(p.get('peak_flops'), 0, 1e12)} "
              f"TFLOP/s ({p.get('peak_source')})", "",
              "| impl | micro batch | tokens/s | MFU | vs LitGPT | peak GiB |", "|---|---|---|---|---|---|"]
    res = p.get("results", {})
    peer = res.get("litgpt", {}).get("tokens_per_sec")
    for impl in ("ours", "litgpt"):
        r = res.get(impl)
        if r:
            lines.append(f"| {impl}{' ' + r['litgpt'] if 'litgpt' in r else ''} | {r['micro_batch']} | "
                         f"{r['tokens_per_sec']:,.0f} | {pct(r['mfu'])} | {ratio(r['tokens_per_sec'], peer)} | "
                         f"{fmt(r['peak_gib'], 1)} |")
        else:
            lines.append(f"| {impl} | {p.get('errors', {}).get(impl, 'not measured')} | | | | |")
    lines.append(f"Anchors: {ANCHORS['pretrain']}.")

    p = parts["decode"]
    lines += ["", f"#### 3. Decoding: {p.get('model')}, random bf16 weights ({fmt(p.get('weight_bytes'), 2, 1e9)} GB), "
                  f"greedy, {p.get('prompt_len')}-token prompt + {p.get('new_tokens')} new tokens; HBM share = weight "
                  f"bytes x decode steps/s / {fmt(p.get('bandwidth'), 2, 1e12)} TB/s", "",
              "| batch | impl | tokens/s | first token ms | HBM share | vs LitGPT |", "|---|---|---|---|---|---|"]
    res = p.get("results", {})
    for batch in (1, 8):
        peer = res.get(f"litgpt/b{batch}", {}).get("tokens_per_sec")
        for impl in ("ours", "ours+compile", "litgpt"):
            key = f"{impl}/b{batch}"
            r = res.get(key)
            if r:
                lines.append(f"| {batch} | {impl} | {r['tokens_per_sec']:,.1f} | {r['ttft_ms']:.0f} | "
                             f"{pct(r['hbm_share'])} | {ratio(r['tokens_per_sec'], peer)} |")
            else:
                error = p.get("errors", {}).get(key) or p.get("errors", {}).get(impl) or "not measured"
                lines.append(f"| {batch} | {impl} | {error} | | | |")
    lines.append(f"Anchor: {ANCHORS['decode']}.")

    p = parts["memory"]
    unit = "GiB (CUDA max allocated)" if not doc["dry"] else "GiB (CUDA; none on the CPU: see peak RSS)"
    lines += ["", f"#### 4. Memory: micro batch 1 x {p.get('seq_len')}, peak {unit}", "",
              "| run | trainable params | peak | with activation checkpointing | peak RSS MB |",
              "|---|---|---|---|---|"]
    for key in ("qlora-nf4", "full-bf16-mixed"):
        r = p.get("results", {}).get(key)
        if r:
            lines.append(f"| {key} {r['model']} {r['precision']} | {r['trainable_params']:,} | "
                         f"{fmt(r['peak_gib'], 2)} | "
                         f"{fmt(r.get('peak_gib_checkpointed'), 2)} | {r['peak_rss_mb']:,.0f} |")
        else:
            lines.append(f"| {key} | {p.get('errors', {}).get(key, 'not measured')} | | | |")
    lines.append(f"Anchor: {ANCHORS['qlora']}.")

    p = parts["packing"]
    lines += ["", f"#### 5. Packing: {p.get('model')}, random weights, {p.get('micro_batch')} rows of "
                  f"{p.get('seq_len')} tokens, {p.get('documents')} documents (mean {fmt(p.get('mean_document'), 0)} "
                  "tokens), forward + backward in bf16-mixed", "",
              "| attention | tokens/s | vs dense mask | step ms | peak GiB |", "|---|---|---|---|---|"]
    res = p.get("results", {})
    dense = res.get("sdpa", {}).get("tokens_per_sec")
    for key, title in (("flex", "FlexAttention, block mask (compiled)"), ("sdpa", "SDPA, dense block-diagonal mask"),
                       ("varlen", "a document at a time (varlen)"), ("causal", "causal, no document mask (ceiling)")):
        r = res.get(key)
        if r:
            lines.append(f"| {title} | {r['tokens_per_sec']:,.0f} | {ratio(r['tokens_per_sec'], dense)} | "
                         f"{r['step_ms']:.1f} | {fmt(r['peak_gib'], 1)} |")
        else:
            why = p.get("errors", {}).get(key) or p.get("skipped", {}).get(key) or "not measured"
            lines.append(f"| {title} | {why} | | | |")
    return "\n".join(lines) + "\n"


def fmt(x, digits: int = 1, scale: float = 1.0) -> str:
    return "" if x is None else f"{x / scale:,.{digits}f}"


def pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else ""


if __name__ == "__main__":
    main()
