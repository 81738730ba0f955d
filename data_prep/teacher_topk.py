"""A teacher's K largest logits at every position of a training set, computed once, for distill.py to read instead of
running the teacher in every epoch of every run.

    python -m data_prep.teacher_topk --teacher_dir out/pretrain/stdlib/final --data.train_dirs '[data/stdlib/train]' \\
        --topk 64 --out_dir data/stdlib/teacher-top64
    python distill.py --config config_hub/distill_stdlib.yaml --teacher_topk_dir data/stdlib/teacher-top64
    python -m data_prep.teacher_topk --teacher_dir T --data.format sft --data.train_files chats.jsonl --topk 64 \\
        --block_size 2048 --precision bf16-true --out_dir data/chats-top64                          # 1 GPU

Writes out_dir/train-i/ for the i-th training source (the i-th of --data.train_dirs, or the train split of the SFT
records): litdata chunks of input_ids and labels (T,) and the teacher's top-K logits, raw (untempered, so that any
--kd.temperature can use them) as values (T, K) float32 and their token ids as indices (T, K) int32, with meta.json
saying what they were built from (teacher, data, K, vocabulary, block_size). The --data flags and --block_size must
be the distill run's (an SFT cache holds the train split that --data.val_split and --seed, distill's --train.seed,
leave): distill.py compares meta.json with its own and refuses a cache built from anything else. One process;
distill.py shards the cache across its ranks when it reads it.
"""

import itertools
import json
import sys
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jsonargparse import CLI
from litdata import StreamingDataset, TokensLoader
from litdata.streaming.writer import BinaryWriter
from tqdm import tqdm

from checkpoint import (atomic_directory, check_writable_directory, load_config, load_model, read_chunk_index,
                        read_json, require, weights_dtype)
from model import GPT, InputError
from sft_data import collate, load_sft_data
from tokenizer import Tokenizer


@dataclass
class DataArgs:
    """distill.py's --data flags that decide the training examples (and only those)."""
    format: str = "chunks"  # "chunks": litdata token chunks, every token a target; "sft": instruction / chat records
    train_dirs: list[str] = field(default_factory=lambda: ["data/stdlib/train"])  # chunks: litdata chunk directories
    train_files: str | list[str] = field(default_factory=list)  # sft: JSON or JSONL: Alpaca, chat or ShareGPT records
    val_files: str | list[str] | None = None  # sft: held-out records; when None, val_split of the train records
    val_split: float = 0.05  # sft: fraction of the train records held out for validation (0: none) unless val_files
    prompt_style: str = "auto"  # sft: chat_template, alpaca, or auto: the chat template when the tokenizer has one
    mask_prompt: bool = True  # sft: learn only the assistant's text (and its end-of-turn token), not the prompt

    def __post_init__(self):
        require(self.format in ("chunks", "sft"), "--data.format", repr(self.format), "chunks or sft")
        require(0 <= self.val_split < 1, "--data.val_split", self.val_split, "a fraction in [0, 1)")


def main(*, teacher_dir: Path, topk: int, out_dir: Path, data: DataArgs = DataArgs(), block_size: int | None = None,
         vocab_size: int | None = None, seed: int = 1337, batch_size: int = 8, chunk_size: int | None = 1024,
         precision: str = "32-true", quantize: str | None = None, device: str = "auto") -> None:
    """Write the teacher's top-`topk` logits over each training source to out_dir/train-i.

    Args:
        teacher_dir: the teacher's checkpoint directory.
        topk: K, the logits kept per position (the KD loss is then renormalised over those K ids).
        out_dir: where train-0, train-1, ... go. One already built from the same teacher, data and K is kept.
        data: the training data, as distill.py's --data flags give it.
        block_size: the student's block_size (the length of its blocks and the truncation of SFT examples);
            default the teacher's.
        vocab_size: compare the first this many logits: the smaller of the two models' vocab_size (either may pad
            past the tokenizer); default the teacher's.
        seed: sft: the seed of the validation split, distill's --train.seed.
        batch_size: sequences per teacher forward pass.
        chunk_size: positions whose logits are made at a time (null: all of a batch at once).
        precision: 32-true, bf16-true or 16-true: the teacher's weights and activations.
        quantize: a quantize.py mode for the teacher (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8).
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
    """
    require(batch_size >= 1, "--batch_size", batch_size, "a positive integer")
    require(chunk_size is None or chunk_size >= 1, "--chunk_size", chunk_size, "a positive integer or null")
    dtype = weights_dtype(precision, allowed=("32-true", "bf16-true", "16-true"))
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    sources = data.train_dirs if data.format == "chunks" else [data.train_files]
    check_writable_directory(out_dir, reads=[teacher_dir, *(data.train_dirs if data.format == "chunks" else [])])
    config = load_config(teacher_dir)
    weights = teacher_dir / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{weights}: not found; a checkpoint directory holds model.safetensors")
    block_size = block_size or config.block_size
    vocab = vocab_size or config.vocab_size
    require(0 < vocab <= config.vocab_size, "--vocab_size", vocab, f"at most the teacher's {config.vocab_size}")
    require(1 <= topk <= vocab, "--topk", topk, f"from 1 to the compared vocabulary of {vocab} ids")
    require(block_size <= config.block_size, "--block_size", block_size,
            f"at most the teacher's {config.block_size}: the teacher could not score longer sequences")
    if data.format == "sft":
        if not data.train_files:
            raise InputError("--data.format sft: name the JSON or JSONL files to train on with --data.train_files")
        # the train split exactly as distill.py's make_datasets draws it
        train_set, _, _ = load_sft_data(data.train_files, Tokenizer(teacher_dir), prompt_style=data.prompt_style,
                                        mask_prompt=data.mask_prompt, max_seq_length=block_size,
                                        val_split=0.0 if data.val_files else data.val_split,
                                        val_paths=data.val_files, seed=seed)
    else:
        for source in sources:
            read_chunk_index(source)  # a missing or corrupt index: one line naming it, before the teacher loads

    teacher = None
    for i, source in enumerate(sources):
        # What distill.py compares with its own run before it reads the cache, all but teacher_quantize (a cache
        # stands in for whichever teacher made it) and topk (the run takes K from here); the weights' size and time
        # tell a retrained teacher in the same directory apart
        meta = dict(teacher=str(weights.resolve()), teacher_bytes=weights.stat().st_size,
                    teacher_mtime_ns=weights.stat().st_mtime_ns, teacher_quantize=quantize, topk=topk, vocab=vocab,
                    format=data.format, source=source, block_size=block_size, prompt_style=data.prompt_style,
                    mask_prompt=data.mask_prompt, val_split=data.val_split, val_files=data.val_files,
                    split_seed=seed if data.format == "sft" else None)
        path = out_dir / f"train-{i}"
        if (path / "meta.json").is_file():
            old, _ = read_json(path / "meta.json"), read_chunk_index(path)  # corrupt files: one line naming them
            changed = [k for k in meta if old.get(k) != meta[k]]
            if changed:
                key = changed[0]
                raise InputError(f"{path}: a teacher cache built for another {key} ({old.get(key)!r}, this run: "
                                 f"{meta[key]!r}); delete it or choose another --out_dir")
            print(f"{path}: already built from this teacher and data; kept")
            continue
        if data.format == "chunks":
            blocks = StreamingDataset(source, item_loader=TokensLoader(block_size=block_size + 1), shuffle=False,
                                      drop_last=True)
            examples = ({"input_ids": block[:-1], "labels": block[1:]} for block in blocks)
        else:
            blocks, examples = train_set, iter(train_set)
        if teacher is None:  # once, and only if a cache must be built
            teacher = load_teacher(teacher_dir, quantize, dtype, device)
        with atomic_directory(path) as tmp:  # a killed build leaves no directory that looks complete
            write_topk(teacher, examples, len(blocks), tmp, topk, vocab, batch_size, chunk_size)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"{path}: the teacher's top-{topk} logits at {len(blocks):,} examples")


def load_teacher(teacher_dir: Path, quantize: str | None, dtype: torch.dtype, device: str) -> GPT:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    # quantised, the 4-bit layers dequantise to the matmuls' dtype
    return load_model(teacher_dir, device=device, dtype=dtype, quantize=quantize,
                      compute_dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def write_topk(teacher: GPT, examples, n_examples: int, out_dir: Path, K: int, vocab: int, batch_size: int,
               chunk_size: int | None) -> None:
    """Run the teacher over the examples, batch_size at a time, and write each with its top-K logits as litdata
    chunks, through litdata's BinaryWriter (the writer litdata.optimize drives from worker processes; here the
    teacher, perhaps on a GPU, stays in this process)."""
    device = teacher.embed.weight.device
    writer = BinaryWriter(str(out_dir), chunk_bytes="64MB")
    progress = tqdm(total=n_examples, desc=f"teacher top-{K}", dynamic_ncols=True)
    index = 0
    while items := list(itertools.islice(examples, batch_size)):
        batch = collate(items)
        h = teacher.trunk(batch["input_ids"].to(device))  # (B, T, n_embd)
        B, T, C = h.shape
        flat = h.reshape(B * T, C)
        step = chunk_size or B * T  # the logits of a chunk of positions at a time, as in distill.py
        topk = [teacher.head(flat[s:s + step]).float()[:, :vocab].topk(K, dim=-1) for s in range(0, B * T, step)]
        values = torch.cat([t.values for t in topk]).view(B, T, K).cpu()  # (B, T, K)
        indices = torch.cat([t.indices for t in topk]).view(B, T, K).int().cpu()  # (B, T, K)
        for b, item in enumerate(items):
            length = len(item["input_ids"])  # without the padding of the batch
            writer.add_item(index, {"input_ids": item["input_ids"].long(), "labels": item["labels"].long(),
                                    "values": values[b, :length].clone(), "indices": indices[b, :length].clone()})
            index += 1
        progress.update(len(items))
    progress.close()
    writer.done()  # the last chunk and this writer's index file
    writer.merge(num_workers=1)  # index.json, which StreamingDataset reads


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
