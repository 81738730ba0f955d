"""Quantise a GPT's block projections with bitsandbytes: 4-bit NF4 / FP4 (QLoRA, Dettmers et al. 2023,
arXiv:2305.14314), optionally with double quantisation of the scales ("-dq"), or 8-bit LLM.int8() (arXiv:2208.07339).

    model = checkpoint.load_model(checkpoint_dir, device="cpu", dtype=torch.bfloat16)
    quantize_model(model, "bnb.nf4-dq", compute_dtype=torch.bfloat16, device="cuda").to("cuda")
    add_lora(model, LoRAConfig(...))   # QLoRA

Always from the float weights already in the model: a bitsandbytes 4-bit state dict does not load back with
load_state_dict (it needs Params4bit.from_prequantized), so we never write quantised checkpoints. With `device`, each
weight moves there alone just before it is quantised, so the float model never has to fit on the accelerator.
The embedding, the output head and the MoE router stay in floating point (as transformers and QLoRA keep lm_head).
"""

import logging

import torch
import torch.nn as nn

from model import GPT, MLP, Attention, LoRALinear

# On a CPU with AVX512-BF16, importing bitsandbytes (0.50) tries to fetch a 4-bit matmul kernel from the Hugging Face
# hub through the optional `kernels` package and, without it, logs a warning. We never run code from a hub, and the
# fallback is bitsandbytes' own kernel; the message would only be a stray line (before every one-line CLI error too).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage())
import bitsandbytes as bnb  # noqa: E402  (after the filter)

# --quantize value -> (bitsandbytes 4-bit type, double quantisation); None = LLM.int8()
MODES = {"bnb.nf4": ("nf4", False), "bnb.nf4-dq": ("nf4", True), "bnb.fp4": ("fp4", False),
         "bnb.fp4-dq": ("fp4", True), "bnb.int8": None}
PROJECTIONS = {Attention: ("q_proj", "k_proj", "v_proj", "o_proj"), MLP: ("gate_proj", "up_proj", "down_proj")}


def quantize_model(model: GPT, mode: str, compute_dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, include_lm_head: bool = False) -> GPT:
    """Swap the attention and MLP projections (every MoE expert's too) for frozen bitsandbytes layers, in place, and
    return the model (move the rest with .to(device) afterwards).

    compute_dtype: what 4-bit layers dequantise to for the matmul; None: the activations' dtype at the first call.
        LLM.int8() ignores it and returns the input's dtype.
    device: where the quantised layers go (default: where each weight is). Quantise there rather than moving
        quantised layers later: a moved LLM.int8() layer keeps its scales on the old device (bitsandbytes stores them
        as attributes of the Parameter object, which Module.to keeps while it swaps the data).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}: expected one of {', '.join(MODES)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("quantize_model: the model already has LoRA layers; quantize first, then add_lora")
    owners = [(m, names) for m in model.modules() for cls, names in PROJECTIONS.items() if isinstance(m, cls)]
    if include_lm_head and model.lm_head is not None:
        owners.append((model, ("lm_head",)))
    for owner, names in owners:
        for name in names:
            linear = getattr(owner, name, None)
            if type(linear) is nn.Linear:
                setattr(owner, name, quantized_linear(linear, mode, compute_dtype, device))
    return model


def quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> nn.Module:
    weight = linear.weight.detach().to(device or linear.weight.device).contiguous()
    bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(weight.device), requires_grad=False)
    if MODES[mode] is None:
        return Linear8bitLt.from_weight(weight, bias)
    quant_type, double_quant = MODES[mode]
    return Linear4bit.from_weight(weight, bias, quant_type, double_quant, compute_dtype)


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' 4-bit layer, quantised from a float Linear, plus the dequantize() that DoRA and merging need."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: nn.Parameter | None, quant_type: str, double_quant: bool,
                    compute_dtype: torch.dtype | None) -> "Linear4bit":
        out_features, in_features = weight.shape
        with torch.device("meta"):  # no float weight allocated only to be replaced
            layer = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                        compress_statistics=double_quant, quant_type=quant_type)
        # Quantise here, on the weight's device, rather than through bitsandbytes' `.to(device)` hook
        data, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, compress_statistics=double_quant,
                                         quant_type=quant_type, module=layer, bnb_quantized=True)
        layer.quant_state = state
        layer.bias = bias
        # On a CPU with AVX512-BF16, bitsandbytes (0.50.2) would repack the weight for its inference kernel at the
        # first eval forward without gradients, and keep it packed: that kernel has no backward (the next training
        # step's gradients stopped at the layer: a validation pass or an RL rollout silently ended QLoRA learning),
        # multiplies in bf16 whatever the compute dtype, and the packing does not undo: unpacked (to save, merge or
        # train) an nf4 weight came back off by up to half its largest entry (its block scales reordered). Never packed.
        layer.support_avx512bf16_for_cpu = False
        return layer

    def use_inference_kernel(self) -> None:
        """For generation only (generation.use_decode_layout): let bitsandbytes repack the weight for its AVX512-BF16
        CPU kernel at the first eval forward (SmolLM2-135M-Instruct nf4 decodes at 1.9x the tokens/s). That kernel
        multiplies in bf16, so only where bf16 is the compute dtype; a packed weight cannot train or unpack (above)."""
        self.support_avx512bf16_for_cpu = self.compute_dtype == torch.bfloat16 and bnb.functional.has_avx512bf16()

    def dequantize(self) -> torch.Tensor:
        # (out_features, in_features), in the original dtype
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes' LLM.int8() layer, quantised from a float Linear, plus dequantize()."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: nn.Parameter | None) -> "Linear8bitLt":
        out_features, in_features = weight.shape
        with torch.device("meta"):
            # threshold 6.0: the paper's outlier threshold (and transformers' llm_int8_threshold default)
            layer = cls(in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0)
        # Row-wise absmax int8 (what Int8Params does on `.to(device)`, but only when moving from the CPU)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        layer.bias = bias
        return layer

    def dequantize(self) -> torch.Tensor:
        # the scales move from the weight to self.state on the first forward (init_8bit_state)
        scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        return bnb.functional.int8_vectorwise_dequant(self.weight.data, scb)  # float32
