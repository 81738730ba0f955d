"""Packing: several documents in one row compute exactly what each computes alone (model.py's document masks), and
packed finetuning trains on the same targets with the same normalisation as the padded run (sft_data.pack)."""

import shutil

import pytest
import torch
import transformers

from convert.families import config_from_hf
from model import GPT, IGNORE_INDEX, document_masks, document_positions
import pretrain
from sft_data import collate_packed, pack, packed_micro_batches
from test_distill import distill_error
from test_distill import read_metrics as read_distill_metrics
from test_distill import run as run_distill
from test_distill import setup_dir, sft_args  # noqa: F401 (setup_dir: a fixture)
from test_finetune import LORA_ARGS, columns, read_metrics, run_in_process, tiny  # noqa: F401 (tiny: a fixture)
from test_pretrain import cli_error as pretrain_error
from test_pretrain import losses as pretrain_losses
from test_pretrain import pretrain_args, tiny_data  # noqa: F401 (tiny_data: a fixture)
from test_pretrain import read_metrics as read_pretrain_metrics
from test_pretrain import run_in_process as run_pretrain
from tiny_hf import TINY_CONFIGS

LENGTHS = [(7, 12, 5), (20, 4), (3, 3, 3, 3, 3, 9)]  # documents per row: short ones, one longer than the window (8)


def tiny_model(family: str, seed: int = 0) -> GPT:
    class_name, kwargs = TINY_CONFIGS[family]
    config = config_from_hf(dict(kwargs, model_type=getattr(transformers, class_name).model_type))
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that softcaps bend and positions matter
            p.normal_(0.0, 0.1)
    return model


def packed_rows(lengths: list[tuple[int, ...]], vocab_size: int, seed: int = 0):
    """Random documents packed into rows padded to the longest (padding: one more document of token 0)."""
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(3, vocab_size, (n,), generator=g) for n in row] for row in lengths]
    T = max(sum(row) for row in lengths)
    idx = torch.zeros(len(lengths), T, dtype=torch.long)
    doc_ids = torch.full((len(lengths), T), -1, dtype=torch.long)
    for b, row in enumerate(docs):
        start = 0
        for d, tokens in enumerate(row):
            idx[b, start:start + len(tokens)] = tokens
            doc_ids[b, start:start + len(tokens)] = d
            start += len(tokens)
        doc_ids[b, start:] = len(row)
    return docs, idx, doc_ids


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_packed_logits_equal_each_document_alone(family, backend):
    model = tiny_model(family)
    model.document_attention = backend
    docs, idx, doc_ids = packed_rows(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids)
        for b, row in enumerate(docs):
            start = 0
            for tokens in row:
                alone = model(tokens[None])[0]
                torch.testing.assert_close(packed[b, start:start + len(tokens)], alone, atol=2e-5, rtol=1e-4)
                start += len(tokens)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])  # FlexAttention's backward runs on CUDA only: test_cuda.py
def test_packed_gradients_equal_the_unpacked_run(family, backend):
    """The loss summed over a packed batch's targets has the gradient of the same sum over the documents one by one."""
    model = tiny_model(family)
    model.document_attention = backend
    docs, idx, doc_ids = packed_rows(LENGTHS, model.config.vocab_size)
    labels = torch.full_like(idx, IGNORE_INDEX)
    for b, row in enumerate(docs):
        start = 0
        for tokens in row:
            labels[b, start:start + len(tokens) - 1] = tokens[1:]
            start += len(tokens)
    model(idx, doc_ids=doc_ids, targets=labels).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(t[None, :-1], targets=t[None, 1:]) for row in docs for t in row).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_no_attention_crosses_a_document_boundary(backend):
    """Changing one document's tokens changes no other document's logits, and the masks say why."""
    model = tiny_model("mistral")
    model.document_attention = backend
    docs, idx, doc_ids = packed_rows([(6, 9, 5)], model.config.vocab_size)
    other = idx.clone()
    other[0, 6:15] = (other[0, 6:15] + 1) % model.config.vocab_size  # the middle document only
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
    assert torch.equal(a[0, :6], b[0, :6]) and torch.equal(a[0, 15:], b[0, 15:])
    assert not torch.allclose(a[0, 6:15], b[0, 6:15])
    full, sliding = document_masks(model.config, doc_ids, "sdpa")
    same_doc = doc_ids[0, :, None] == doc_ids[0, None, :]
    assert not (full[0, 0] & ~same_doc).any() and not (sliding[0, 0] & ~same_doc).any()
    assert full[0, 0].sum() == sum(n * (n + 1) // 2 for n in (6, 9, 5))  # causal within each document
    far = torch.arange(20)[:, None] - torch.arange(20)[None, :] >= model.config.sliding_window
    assert not (sliding[0, 0] & far).any() and (full[0, 0] & far).any()


def test_positions_restart_with_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]


def test_doc_ids_refuse_the_generation_arguments():
    model = tiny_model("llama")
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="doc_ids"):
        model(idx, doc_ids=torch.zeros_like(idx), pad=torch.zeros(1, dtype=torch.long))


# ---- packed finetuning ------------------------------------------------------------------------------------------

def test_best_fit_decreasing_places_every_item_once_within_capacity():
    lengths = [9, 2, 7, 3, 5, 5, 1, 8, 4, 6, 10, 2, 3]  # 65 tokens: 7 rows of 10 at best
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 7
    assert [sum(lengths[i] for i in row) for row in rows] == sorted((sum(lengths[i] for i in r) for r in rows),
                                                                    reverse=True)
    assert pack([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="cannot fit"):
        pack([5], 4)


def test_packed_rows_keep_each_examples_labels_and_mask_the_padding():
    examples = [{"input_ids": torch.arange(n) + 10 * n, "labels": torch.arange(n) + 10 * n + 1} for n in (5, 3, 6, 2)]
    for x in examples:
        x["labels"][0] = IGNORE_INDEX  # a prompt token
    batches = packed_micro_batches(examples, rows_per_batch=1, row_length=8, pad_id=0)
    assert len(batches) == 2 and all(b["input_ids"].shape == (1, 8) for b in batches)  # 16 tokens in 2 rows, no pad
    seen = []
    for batch in batches:
        ids, labels, docs = batch["input_ids"][0], batch["labels"][0], batch["doc_ids"][0]
        for d in docs.unique():
            where = docs == d
            match = [x for x in examples if torch.equal(x["input_ids"], ids[where])]
            assert len(match) == 1 and torch.equal(labels[where], match[0]["labels"])  # its own targets, no other
            seen.append(int(ids[where][0]))
    assert sorted(seen) == sorted(int(x["input_ids"][0]) for x in examples)
    fixed = packed_micro_batches(examples, rows_per_batch=2, row_length=9, pad_id=0, fixed_rows=True)
    assert [tuple(b["input_ids"].shape) for b in fixed] == [(2, 9)]  # 9 + 7: two rows of 9, the second padded
    assert (fixed[0]["labels"][1, 7:] == IGNORE_INDEX).all()
    flat = packed_micro_batches(examples, rows_per_batch=2, row_length=9, pad_id=0)
    assert [tuple(b["input_ids"].shape) for b in flat] == [(1, 16)]  # the same two rows end to end, no padding
    padded = collate_packed([[examples[0]], [examples[1], examples[3]]], pad_id=0, pad_to=7)
    assert padded["input_ids"].shape == (2, 7)
    assert (padded["labels"][0, 5:] == IGNORE_INDEX).all() and (padded["doc_ids"][0, 5:] == 1).all()
    assert padded["doc_ids"][1].tolist() == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("script", ["finetune_full.py", "finetune_lora.py"])
def test_packed_finetuning_gives_the_padded_runs_losses(tiny, tmp_path, script):
    """The same examples per step, the same targets, the same normalisation: the losses of the padded run up to float
    tolerance, though the packed run makes fewer, longer forward passes."""
    extra = [*LORA_ARGS, "--lora.dropout", "0"] if script == "finetune_lora.py" else []  # dropout masks follow shapes
    run_in_process(script, tiny, tmp_path / "padded", *extra)
    run_in_process(script, tiny, tmp_path / "packed", *extra, "--data.packing", "true")
    padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
    for key in ("train_loss", "val_loss"):
        assert [float(r[key] or 0) for r in packed] == pytest.approx([float(r[key] or 0) for r in padded], abs=2e-5)
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    assert float(packed[-1]["train_loss"]) < float(packed[0]["train_loss"]) - 1.0


def test_packed_finetuning_resumes_exactly(tiny, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    run_in_process("finetune_full.py", tiny, reference, "--data.packing", "true")
    shutil.copytree(reference, out)
    for name in ("step-00000006", "step-00000008", "final"):
        shutil.rmtree(out / name)
    run_in_process("finetune_full.py", tiny, out, "--data.packing", "true", "--resume", "auto")
    assert columns(out) == columns(reference)


def test_packed_distillation_gives_the_padded_runs_losses(setup_dir, tmp_path):
    """distill.py's SFT data packed: the student's CE and the KD divergence to a live teacher (both models see the
    packed rows) are the padded run's, step by step."""
    run_distill(sft_args(setup_dir, tmp_path / "padded"))
    run_distill(sft_args(setup_dir, tmp_path / "packed", "--data.packing", "true"))
    padded, packed = read_distill_metrics(tmp_path / "padded"), read_distill_metrics(tmp_path / "packed")
    for key in ("train_loss", "ce_loss", "kd_loss", "val_loss"):
        assert [float(r[key] or 0) for r in packed] == pytest.approx([float(r[key] or 0) for r in padded], abs=2e-5)


# ---- pretraining with document masks ----------------------------------------------------------------------------

def test_documents_of_a_streamed_block_begin_at_bos_and_after_eos():
    bos, eos = 1, 2
    block = torch.tensor([[7, 8, eos, bos, 5, 6, eos, bos, 9], [5, eos, 6, 7, eos, eos, bos, 3, 4]])
    assert pretrain.document_ids(block, bos, eos).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2],
                                                               [0, 0, 1, 1, 1, 2, 3, 3, 3]]
    assert pretrain.document_ids(block, None, eos).tolist()[0] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert pretrain.document_ids(block, bos, None).tolist()[0] == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_pretraining_with_document_masks_learns_and_resumes_exactly(tiny_data, tmp_path):
    """Blocks of 32 tokens over documents of a few hundred: some blocks hold a boundary, whose two sides then never
    see each other. The run learns, validates under the same masks, and resumes to the same numbers."""
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    run_pretrain(tiny_data, reference, "--data.document_mask", "true", steps=20)
    rows = read_pretrain_metrics(reference)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 1.0 and rows[9]["val_loss"]
    shutil.copytree(reference, out)
    for name in ("step-00000020", "final"):
        shutil.rmtree(out / name)
    run_pretrain(tiny_data, out, "--data.document_mask", "true", "--resume", "auto", steps=20)
    assert pretrain_losses(out) == pretrain_losses(reference)
    run_pretrain(tiny_data, tmp_path / "unmasked", steps=20)  # the same blocks: the masks are what differs
    assert pretrain_losses(tmp_path / "unmasked") != pretrain_losses(reference)
    message = pretrain_error(pretrain_args(tiny_data, tmp_path / "none", "--data.document_mask", "true",
                                           "--tokenizer_dir", "null"))
    assert message.startswith("--data.document_mask needs --tokenizer_dir")


@pytest.mark.slow  # compiling FlexAttention's CPU kernel takes most of a minute
def test_compiled_flex_attention_equals_the_dense_mask(monkeypatch):
    """The path CUDA runs, compiled (here by inductor's CPU backend: forward only, FlexAttention has no CPU backward),
    on Gemma 2's sliding window and softcap, against the dense SDPA reference."""
    import model as model_module
    monkeypatch.setattr(model_module, "flex_attention_fn", lambda cuda: torch.compile(model_module.flex_attention))
    model = tiny_model("gemma2")
    docs, idx, doc_ids = packed_rows([(70, 50), (128,)], model.config.vocab_size)
    with torch.no_grad():
        model.document_attention = "sdpa"
        dense = model(idx, doc_ids=doc_ids)
        model.document_attention = "flex"
        torch.testing.assert_close(model(idx, doc_ids=doc_ids), dense, atol=2e-5, rtol=1e-4)


def test_packing_refuses_what_needs_one_example_per_row(setup_dir, tmp_path):
    """On-policy sampling continues each row's prompt, and a top-K cache holds one example's logits per row: with packed
    rows either would read the wrong tokens, so each is one line; token chunks are full blocks with nothing to pack."""
    on_policy = distill_error(sft_args(setup_dir, tmp_path / "a", "--data.packing", "true", "--on_policy_fraction",
                                       "0.5"))
    assert on_policy.startswith("--on_policy_fraction with --data.packing")
    cached = distill_error(sft_args(setup_dir, tmp_path / "b", "--data.packing", "true", "--teacher_topk_dir",
                                    str(tmp_path)))
    assert cached.startswith("--teacher_topk_dir with --data.packing")
    chunks = distill_error(sft_args(setup_dir, tmp_path / "c", "--data.packing", "true", "--data.format", "chunks"))
    assert "--data.packing True: expected false with --data.format chunks" in chunks
