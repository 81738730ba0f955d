"""Train a byte-level BPE tokenizer on text files, directories or JSONL, and write tokenizer.json +
tokenizer_config.json + generation_config.json that every script (and transformers.AutoTokenizer) reads.

    python -m data_prep.train_tokenizer --inputs "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        --out_dir checkpoints/stdlib-tokenizer --vocab_size 8192 --pattern "*.py"
"""

import json
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from checkpoint import atomic_directory, check_writable_directory, require
from model import InputError
from corpus import find_files, iter_documents

BOS, EOS = "<|bos|>", "<|eos|>"
MIN_VOCAB = 256 + 2  # the byte alphabet and the two special tokens: a smaller size would be ignored


def main(*, inputs: str | list[str], out_dir: Path, vocab_size: int = 8192, pattern: str = "*", exclude: list[str] = [],
         text_field: str = "text", max_files: int | None = None) -> None:
    """Train a byte-level BPE on the documents of `inputs`.

    Args:
        inputs: a file or directory (searched recursively), or a list of them of text, .jsonl or .jsonl.zst.
        out_dir: where to write tokenizer.json, tokenizer_config.json and generation_config.json.
        vocab_size: size of the vocabulary, special tokens included.
        pattern: glob that files inside directories must match (e.g. "*.py").
        exclude: folder names to skip inside directories (e.g. site-packages test).
        text_field: the JSONL field that holds the text.
        max_files: use at most this many files (quick experiments).
    """
    require(vocab_size >= MIN_VOCAB, "--vocab_size", vocab_size, f"at least {MIN_VOCAB} (256 bytes, {BOS} and {EOS})")
    require(max_files is None or max_files >= 1, "--max_files", max_files, "a positive integer or null (all)")
    files = find_files(inputs, pattern, exclude)[:max_files]
    check_writable_directory(out_dir, reads=files)  # now, not after the training
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every byte is in the alphabet, so no text is ever unknown
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n_documents = 0

    def counted(documents):
        nonlocal n_documents
        for n_documents, text in enumerate(documents, 1):
            yield text

    tokenizer.train_from_iterator(counted(iter_documents(files, text_field)), trainer=trainer)
    if n_documents == 0:  # every file empty or skipped: a tokenizer of bytes alone must not replace a trained one
        what = f"{files[0]} is" if len(files) == 1 else f"all {len(files)} input files are"
        raise InputError(f"no text to train on: {what} empty or not UTF-8; {out_dir} is left as it was")
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    # Every encoding starts with bos, as Llama's tokenizer does: prompts then look like training documents
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, bos_id)])
    with atomic_directory(out_dir) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS, pad_token=EOS,
            model_max_length=1_000_000), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(dict(bos_token_id=bos_id, eos_token_id=eos_id,
                                                                    pad_token_id=eos_id), indent=2))
    print(f"trained a {tokenizer.get_vocab_size()}-token BPE on {len(files)} files -> {out_dir}")


if __name__ == "__main__":
    try:
        CLI(main, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
