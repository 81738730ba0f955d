"""GGUF export: for each family transformers' GGUF loader reads, our checkpoint -> convert.to_gguf -> transformers
`from_pretrained(gguf_file=...)` gives our logits and our tokenizer's ids."""

import functools
import json
import runpy
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny_hf import save_hf_model
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from checkpoint import load_model, save_lora
from convert import from_hf, to_gguf
from model import InputError, LoRAConfig, add_lora, lora_state_dict
from tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

# The tiny families whose llama.cpp architecture transformers' GGUF loader reads (its GGUF_SUPPORTED_ARCHITECTURES:
# llama, mistral-as-llama, qwen2, qwen3, gemma2, phi3). mixtral, phi and gpt_neox have no exporter here.
FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]
# Config values transformers' GGUF loader does not read (they are not in its GGUF_CONFIG_MAPPING, so its config
# class defaults apply), given to from_pretrained so that it builds the tiny model. llama.cpp reads the ones it
# has from the file (rope_freqs, sliding_window, the softcaps), which test_metadata checks are written.
LOADER_GAPS = {
    "llama3": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qwen3": dict(head_dim=32),  # Qwen3Config's default 128 (every released Qwen3's); it ignores key_length
    "gemma2": dict(query_pre_attn_scalar=32, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "phi3": dict(sliding_window=8),
}
# llama.cpp's llama architecture has no sliding window (nor has llama.cpp's Mistral): compare within the window
T = {"mistral": 8}
CORPUS = ["def add(x, y):\n    return x + y\n", "The cat sat on the mat. It's 12 o'clock!", "hello world, hello there"]
TEXTS = ["def add(x, y):\n    return x", "hello there 12 cat", "<s>hi</s> the mat", "It's  the cat"]
# f32 and the float formats: transformers dequantises the file to float32 and runs the very ops ours runs, so its
# logits equal ours on the same rounded weights exactly (measured max |delta| = 0); 1e-6 leaves room for a BLAS.
EXACT = dict(atol=1e-6, rtol=0)
# q8_0 against our float32 model: one scale per 32 weights, |error| <= scale/2 = max|w|/254 per weight. Measured
# max |delta logits| on the tiny models (weights N(0, 0.1), logits up to ~3.5): 0.047 (Mistral, T=8) to 0.13 (Gemma 2).
Q8_0_ATOL = 0.2


def byte_level_tokenizer(path, post_bos: bool):
    """A byte-level BPE tokenizer (as SmolLM2's, Qwen's, Llama 3's) small enough for vocab_size 128: trained on a few
    lines, so its alphabet is their characters only, with <pad>, <s>, </s> at the tiny configs' ids 0, 1, 2."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(to_gguf.LLAMA3_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>"]))
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template="{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}")))


def sentencepiece_tokenizer(path):
    """A sentencepiece-style BPE (Llama 2's, TinyLlama's, Phi-3's tokenizer.json): '▁' for spaces, byte fallback."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")))


def checkpoint_dir(family, tmp_path_factory):
    """A tiny random transformers model of the family, converted by from_hf, with a tiny tokenizer."""
    root = tmp_path_factory.mktemp(family)
    save_hf_model(family, root / "hf")
    from_hf.convert(root / "hf", out_dir=root / "ours")
    byte_level_tokenizer(root / "ours", post_bos=family in ("llama", "llama3"))
    if family == "gemma2":  # llama.cpp implies query_pre_attn_scalar = head_dim (32 here), the tiny config has 24
        config = root / "ours" / "model_config.yaml"
        config.write_text(config.read_text().replace("query_pre_attn_scalar: 24", "query_pre_attn_scalar: 32"))
    return family, root


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return checkpoint_dir(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return checkpoint_dir("qwen2", tmp_path_factory)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return checkpoint_dir("llama", tmp_path_factory)


def load_gguf(path, family=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **LOADER_GAPS.get(family, {}))
    return model.eval()


def rounded(model, dtype: str):
    """Our model with each 2-D weight rounded as to_gguf stores it: the reference its GGUF must reproduce."""
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                x = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)))
    return model


def idx_for(family, seed=1):
    return torch.randint(0, 128, (2, T.get(family, 24)), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_gives_our_logits(family_dir, dtype):
    family, root = family_dir
    out = to_gguf.convert(root / "ours", out=root / f"{dtype}.gguf", dtype=dtype)
    theirs = load_gguf(out, family)
    model = load_model(root / "ours")
    idx = idx_for(family)
    with torch.no_grad():
        expected, got = model(idx), theirs(idx).logits
        torch.testing.assert_close(got, rounded(model, dtype)(idx) if dtype != "f32" else expected, **EXACT)
        if dtype == "q8_0":
            assert (got - expected).abs().max() < Q8_0_ATOL


def test_tokenizer_ids_equal_ours(family_dir):
    _, root = family_dir
    out = to_gguf.convert(root / "ours", out=root / "tok.gguf", dtype="f32")
    theirs = transformers.AutoTokenizer.from_pretrained(root, gguf_file=out.name)
    ours = Tokenizer(root / "ours")
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    messages = [{"role": "user", "content": "hello"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages)


def test_metadata(family_dir):
    """What llama.cpp reads and transformers' loader does not: written, and equal to our Config."""
    family, root = family_dir
    out = to_gguf.convert(root / "ours", out=root / "meta.gguf", dtype="f16")
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields["general.architecture"]
    config = load_model(root / "ours").config
    assert arch == {"mistral": "llama", "llama3": "llama"}.get(family, family)
    assert fields[f"{arch}.attention.key_length"] == config.head_dim
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size  # padded with [PAD{i}], as llama.cpp does
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) != config.tie_embeddings
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values() if len(t.shape) == 1)
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == config.attn_softcap
        assert fields["gemma2.final_logit_softcapping"] == config.final_softcap
        assert fields["gemma2.attention.sliding_window"] == config.sliding_window
    if family == "phi3":
        assert fields["phi3.attention.sliding_window"] == config.sliding_window
    if family == "llama3":
        # llama.cpp divides each frequency by rope_freqs: the result must be transformers' own llama3 frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        hf_config = transformers.AutoConfig.from_pretrained(root / "hf")
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        dim = config.head_dim
        plain = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
        torch.testing.assert_close(plain / factors, scaled, atol=0, rtol=1e-6)
        assert 1.0 in factors and config.rope_factor in factors and len(set(factors.tolist())) > 2  # three bands


def test_sentencepiece_tokenizer(tmp_path):
    """A sentencepiece-style tokenizer.json is written as llama.cpp's "llama" model (scores, byte/unknown types)."""
    save_hf_model("phi3", tmp_path / "hf")
    from_hf.convert(tmp_path / "hf", out_dir=tmp_path / "ours")
    sentencepiece_tokenizer(tmp_path / "ours")
    out = to_gguf.convert(tmp_path / "ours", out=tmp_path / "m.gguf", dtype="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"]
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.UNKNOWN
    assert fields["tokenizer.ggml.add_bos_token"] and not fields["tokenizer.ggml.add_eos_token"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = Tokenizer(tmp_path / "ours")
    for text in ["def add(x, y):", "hello there 12 cat", "The cat sat on the mat."]:  # the tokenizer's alphabet
        assert theirs(text)["input_ids"] == ours.encode(text), text


def test_q4_formats_are_written_and_load(qwen2_dir):
    family, root = qwen2_dir
    idx = idx_for(family)
    for dtype in ("q4_0", "q4_1"):
        out = to_gguf.convert(root / "ours", out=root / f"{dtype}.gguf", dtype=dtype)
        with torch.no_grad():
            expected = rounded(load_model(root / "ours"), dtype)(idx)
            torch.testing.assert_close(load_gguf(out, family)(idx).logits, expected, **EXACT)


def test_lora_directory_is_merged_first(llama_dir):
    family, root = llama_dir
    model = load_model(root / "ours")
    lora = LoRAConfig(r=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    add_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    save_lora(root / "lora", lora, lora_state_dict(model), base_checkpoint_dir=root / "ours",
              tokenizer_dir=root / "ours")
    out = to_gguf.convert(root / "lora", out=root / "lora.gguf", dtype="f32")
    idx = idx_for(family)
    with torch.no_grad():
        # the merge (W + scale * B @ A in float32) sums in another order than the adapted forward: 1e-5
        torch.testing.assert_close(load_gguf(out, family)(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
        plain = load_model(root / "ours")(idx)
        assert (plain - model(idx)).abs().max() > 0.1  # the adapter does change the logits


def run_cli(*args, monkeypatch) -> str | None:
    """`python -m convert.to_gguf ARGS` in this process (its __main__ block, without another interpreter's start-up):
    None on success, else what it exits with."""
    monkeypatch.setattr(sys, "argv", ["to_gguf", *map(str, args)])
    try:
        with warnings.catch_warnings():  # runpy warns that it runs a module already imported: the point here
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module("convert.to_gguf", run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def assert_one_line_error(message, *needles):
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, message


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("neox")
    save_hf_model("gpt_neox", root / "hf")
    from_hf.convert(root / "hf", out_dir=root / "ours")
    return root


def test_unsupported_family_is_an_error_and_writes_nothing(neox_dir):
    with pytest.raises(InputError, match="gpt_neox"):
        to_gguf.convert(neox_dir / "ours", out=neox_dir / "m.gguf")
    assert list(neox_dir.glob("*.gguf*")) == list(neox_dir.glob(".*")) == []


def test_cli(qwen2_dir, tmp_path, monkeypatch):
    _, root = qwen2_dir
    run_cli = functools.partial(globals()["run_cli"], monkeypatch=monkeypatch)
    assert run_cli(root / "ours", "--out", tmp_path / "m.gguf", "--dtype", "q8_0") is None
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the temporary name is gone
    assert_one_line_error(run_cli(root / "ours", "--out", tmp_path / "x.gguf", "--dtype", "q3_k"), "q3_k", "q8_0")
    # an output that is not a .gguf name could be one of the checkpoint's own files: refused
    assert_one_line_error(run_cli(root / "ours", "--out", root / "ours" / "model.safetensors"), ".gguf")
    (tmp_path / "d.gguf").mkdir()
    assert_one_line_error(run_cli(root / "ours", "--out", tmp_path / "d.gguf"), "is a directory")
    assert_one_line_error(run_cli(tmp_path / "nothing", "--out", tmp_path / "y.gguf"), "model_config.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "m.gguf"]


def test_missing_gguf_package_says_how_to_install_it(qwen2_dir, tmp_path, monkeypatch):
    _, root = qwen2_dir
    monkeypatch.setattr(to_gguf, "gguf", None)
    with pytest.raises(InputError, match=r"pip install 'gptkit\[gguf\]'"):
        to_gguf.convert(root / "ours", out=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_family_cli(neox_dir, tmp_path, monkeypatch):
    assert_one_line_error(run_cli(neox_dir / "ours", "--out", tmp_path / "m.gguf", monkeypatch=monkeypatch),
                          "gpt_neox", "llama")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_greedy_answer_through_gguf(smollm2_hf_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: ours -> GGUF (f16) -> transformers answers a chat prompt as our model does."""
    from_hf.convert(smollm2_hf_dir, out_dir=tmp_path / "ours")
    out = to_gguf.convert(tmp_path / "ours", out=tmp_path / "smollm2-f16.gguf", dtype="f16")
    tok = Tokenizer(tmp_path / "ours")
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == theirs_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert theirs_tok(prompt)["input_ids"] == ids
    # our model with the f16-rounded weights the file holds, so that the two greedy paths see the same numbers
    model = load_model(tmp_path / "ours", dtype=torch.float16).float()
    theirs = load_gguf(out)
    n_new = 32
    with torch.no_grad():
        ours_ids = list(ids)
        while len(ours_ids) < len(ids) + n_new and ours_ids[-1] not in tok.stop_ids:
            ours_ids.append(int(model(torch.tensor([ours_ids]))[0, -1].argmax()))
        generated = theirs.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)
    assert generated[0].tolist() == ours_ids
    assert "Paris" in tok.decode(ours_ids[len(ids):])
