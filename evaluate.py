"""Evaluate checkpoints: perplexity on held-out text, and lm-evaluation-harness tasks run on our own model.

    python evaluate.py --checkpoint_dir out/pretrain/stdlib/final --data data/stdlib/val         # litdata chunks
    python evaluate.py --checkpoint_dir DIR --data notes.txt essays/ --stride 128 --out ppl.json   # text files, JSONL
    python evaluate.py --checkpoint_dir out/pretrain/stdlib --data data/stdlib/val   # a run's step-*/, final/: a table
    python evaluate.py --checkpoint_dir out/pretrain/stdlib/step-* --data data/stdlib/val
    pip install -e '.[eval]'
    python evaluate.py --checkpoint_dir DIR --tasks hellaswag,arc_easy --device cuda --precision bf16-true --out r.json
    HF_DATASETS_OFFLINE=1 python evaluate.py --checkpoint_dir DIR --tasks my_task --include_path my_tasks/ --limit 50

Perplexity: each document is scored on its own: a text file or a JSONL line as the model's tokenizer encodes it
(its own bos, if it adds one, and no eos: transformers' exp(model(ids, labels=ids).loss) with
ids = tokenizer(text).input_ids), and one bos ... eos run of a chunk directory as data_prep/prepare_text.py wrote it.
Windows of --max_seq_length tokens advance by --stride: every token but the first is predicted once, with at least
max_seq_length - stride tokens of context when the document has them.
Prints {"loss": mean token NLL, "perplexity": exp(loss), "tokens": n, ...} as JSON.
Tasks: lm-eval's results JSON goes to --out and its table to stdout. A task over local files
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) in an --include_path YAML runs offline.
Several checkpoints print one table row each; --out then maps each checkpoint to its result.
"""

import json
import math
import sys
from argparse import ArgumentError
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from tqdm import tqdm

from checkpoint import CONFIG, WEIGHTS, load_model, read_chunk_index, require, weights_dtype
from corpus import find_files, read_documents
from generation import generate
from model import GPT, IGNORE_INDEX, InputError
from tokenizer import Tokenizer

LIST_FLAGS = ("--checkpoint_dir", "--data")  # flags that take several values, as a shell glob gives them
# Positions that go through the output head at once when scoring (as model.token_logprobs): the whole (B, T, vocab)
# logits would take 34 GB in float32 for a 128k vocabulary at batch 8 x 8192
HEAD_ROWS = 256


def main(
    *,
    checkpoint_dir: list[Path] | Path,
    data: list[Path] | Path | None = None,
    tasks: list[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: Path | None = None,
    batch_size: int = 8,
    max_seq_length: int | None = None,
    stride: int | None = None,
    precision: str = "32-true",
    device: str = "auto",
    out: Path | None = None,
) -> None:
    """Perplexity (--data) or lm-eval tasks (--tasks) of one or more checkpoint directories.

    Args:
        checkpoint_dir: checkpoint directories, or a training run's out_dir (its step-*/ and final/, in order).
        data: text / JSONL files, directories of them, or litdata chunk directories: perplexity.
        tasks: lm-eval task names, comma-separated (e.g. hellaswag,arc_easy).
        num_fewshot: few-shot examples per task (None: each task's own default).
        limit: evaluate only this many documents per task (a fraction below 1).
        include_path: a directory of your own task YAMLs.
        batch_size: sequences per forward pass.
        max_seq_length: longest sequence the model reads (None: block_size).
        stride: perplexity: tokens each window advances (None: max_seq_length // 2).
        precision: 32-true, bf16-true or 16-true: the dtype of the weights and activations.
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        out: write the results as JSON here.
    """
    dtype = weights_dtype(precision, allowed=("32-true", "bf16-true", "16-true"))
    if (data is None) == (tasks is None):
        raise InputError("give --data (perplexity) or --tasks (lm-eval), one of the two")
    # the results are written after the whole evaluation: check their place first
    if out is not None and (out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents)):
        raise InputError(f"--out {out}: expected a JSON file path, not a directory or a path under a file")
    require(stride is None or stride >= 1, "--stride", stride, "a positive number of tokens (null: half a window)")
    require(batch_size >= 1, "--batch_size", batch_size, "a positive integer")
    checkpoints = find_checkpoints(checkpoint_dir if isinstance(checkpoint_dir, list) else [checkpoint_dir])
    if data is not None:
        data = data if isinstance(data, list) else [data]
        if missing := [p for p in data if not p.exists()]:
            raise InputError(f"--data {missing[0]}: no such file or directory")
    else:
        tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        task_manager = make_task_manager(tasks, include_path)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    results = {}
    for checkpoint in tqdm(checkpoints, desc="checkpoints", disable=len(checkpoints) == 1):
        model = load_model(checkpoint, device=device, dtype=dtype).eval()
        tokenizer = Tokenizer(checkpoint)
        seq_length = max_seq_length or model.config.block_size
        if not 1 < seq_length <= model.config.block_size:
            raise InputError(f"--max_seq_length {seq_length}: expected 2 to block_size "
                             f"({model.config.block_size})")
        if data is not None:
            window_stride = seq_length // 2 if stride is None else stride
            if not 1 <= window_stride <= seq_length:
                raise InputError(f"--stride {window_stride}: expected 1 to max_seq_length ({seq_length})")
            documents = load_documents(data, tokenizer)  # again for each checkpoint: their tokenizers may differ
            results[str(checkpoint)] = dict(perplexity(model, documents, seq_length, window_stride, batch_size),
                                            max_seq_length=seq_length, stride=window_stride,
                                            checkpoint_dir=str(checkpoint), data=[str(p) for p in data])
        else:
            results[str(checkpoint)] = run_tasks(model, tokenizer, task_manager, tasks, num_fewshot, limit,
                                                 batch_size, seq_length)
            results[str(checkpoint)]["config"].update(checkpoint_dir=str(checkpoint), precision=precision)
        del model  # before the next checkpoint loads: one model in memory at a time
    report(results, out, tasks is not None)


def find_checkpoints(paths: list[Path]) -> list[Path]:
    """The checkpoint directories named, with a training run's out_dir standing for its step-*/ and final/."""
    found = []
    for path in paths:
        if path.is_dir() and not (path / CONFIG).is_file():  # a run: step-XXXXXXXX sorts in training order
            run = sorted(path.glob("step-*")) + sorted(path.glob("final"))
            if not run:
                raise InputError(f"--checkpoint_dir {path}: neither a checkpoint ({CONFIG} not found) nor a "
                                 "training run (no step-*/ or final/ in it)")
            found += run
        else:
            found.append(path)
    found = list(dict.fromkeys(found))  # each once, in the order given
    for path in found:  # all of them, before the first evaluation starts
        for name in (CONFIG, WEIGHTS, "tokenizer.json"):
            if not (path / name).is_file():
                raise InputError(f"{path / name}: not found; a checkpoint directory holds {WEIGHTS}, {CONFIG} "
                                 "and the tokenizer files")
    return found


def load_documents(paths: list[Path], tokenizer: Tokenizer) -> list[torch.Tensor]:
    """The token ids of every document: a chunk directory's bos + text + eos runs as data_prep/prepare_text.py wrote
    them, and a text as the tokenizer encodes it."""
    documents = []
    for path in paths:
        if (path / "index.json").is_file():
            documents += split_documents(read_chunks(path), tokenizer.bos_id, tokenizer.eos_id)
            continue
        # The tokenizer's own encoding, as transformers' tokenizer(text): what users compare a perplexity against.
        # Not bos + text + eos: a tokenizer may add no bos (Qwen2.5), and an instruct model's bos and eos are chat
        # tokens (SmolLM2-Instruct's <|im_start|> and <|im_end|>) that a plain text never holds.
        for file in find_files(path):
            documents += [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in read_documents(file)]
    return documents


def read_chunks(chunk_dir: Path, block: int = 4096) -> torch.Tensor:
    """Every token of a litdata chunk directory, in order. TokensLoader serves fixed-size blocks and drops the end
    of each chunk that does not fill one, so each chunk is read in blocks and its end token by token (reading all
    of it token by token runs at ~40k tokens/s). Item i of a TokensLoader dataset is block i in the order of
    index.json's chunks."""
    index = read_chunk_index(chunk_dir)
    from litdata import StreamingDataset, TokensLoader  # here, not above: it adds ~1.5 s to every start

    blocks = StreamingDataset(str(chunk_dir), item_loader=TokensLoader(block_size=block), shuffle=False)
    tokens = StreamingDataset(str(chunk_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    parts, first_block, first_token = [], 0, 0
    for chunk in index["chunks"]:
        n_blocks = chunk["dim"] // block
        parts += [blocks[i] for i in range(first_block, first_block + n_blocks)]
        parts += [tokens[i] for i in range(first_token + n_blocks * block, first_token + chunk["dim"])]
        first_block, first_token = first_block + n_blocks, first_token + chunk["dim"]
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def split_documents(tokens: torch.Tensor, bos_id: int | None, eos_id: int | None) -> list[torch.Tensor]:
    """A stream of bos ... eos documents cut into them: a document starts at a bos right after an eos (which holds
    when bos and eos are one token, too)."""
    if bos_id is None or eos_id is None:
        return [tokens]
    starts = ((tokens[:-1] == eos_id) & (tokens[1:] == bos_id)).nonzero().flatten() + 1
    return list(torch.tensor_split(tokens, starts))


@torch.inference_mode()
def perplexity(model: GPT, documents: list[torch.Tensor], max_seq_length: int, stride: int, batch_size: int) -> dict:
    """Mean NLL of every token of every document but its first (nothing precedes it to predict it from)."""
    device = model.embed.weight.device
    windows = [(doc, *w) for doc in documents for w in strided_windows(len(doc), max_seq_length, stride)]
    if not windows:
        raise InputError("--data: no document has two tokens or more: nothing to score")
    windows.sort(key=lambda w: w[1] - w[2])  # longest first: similar lengths share a batch, less padding
    nll, n_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch"):
        batch = windows[i:i + batch_size]
        idx = right_pad([doc[start:end] for doc, start, end, _ in batch])  # (B, T)
        targets = torch.full_like(idx, IGNORE_INDEX)  # the context and the padding are not scored
        for row, (doc, start, end, n) in enumerate(batch):
            # the window's last n predictions, of the tokens end + 1 - n ... end
            targets[row, end - start - n:end - start] = doc[end + 1 - n:end + 1]
            n_tokens += n
        # through the chunked head (a few hundred positions at a time), never the whole (B, T, vocab_size) logits
        logprobs = model(idx.to(device), targets=targets.to(device), per_token=True)  # (B, T), 0 where not scored
        nll -= logprobs.sum(dtype=torch.float64)
    loss = nll.item() / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_tokens, "documents": len(documents),
            "windows": len(windows)}


def strided_windows(n_tokens: int, max_seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n) for each window over a document: the model reads tokens start ... end - 1 and its last n
    predictions score tokens end + 1 - n ... end. The first window scores all it reads; each next one ends
    `stride` tokens later and reads max_seq_length tokens back from there, so each token is scored once, by the
    window that gives it the most context (the standard sliding-window perplexity)."""
    windows, scored = [], 0  # tokens 1 ... scored have been scored
    while scored < n_tokens - 1:
        end = min(scored + stride if scored else max_seq_length, n_tokens - 1)
        windows.append((max(0, end - max_seq_length), end, end - scored))
        scored = end
    return windows


def right_pad(rows: list) -> torch.Tensor:
    """Rows of token ids, padded on the right into (B, T): under causal attention no real token sees the padding."""
    idx = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, :len(row)] = torch.as_tensor(row)
    return idx


def make_task_manager(tasks: list[str], include_path: Path | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("--tasks needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    if include_path is not None:
        if not include_path.is_dir():
            raise InputError(f"--include_path {include_path}: not a directory")
        # Indexing lm-eval's ~15k built-in task configs takes ~15 s: skip it when --include_path has every task
        # asked for (groups may name built-in tasks, so they take the full index).
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise InputError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; `lm-eval ls tasks` lists "
                         "them, --include_path DIR adds your own YAML")
    return manager


def run_tasks(model, tokenizer, task_manager, tasks, num_fewshot, limit, batch_size, max_length) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=make_lm(model, tokenizer, batch_size, max_length), tasks=tasks,
                                   num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=False)


def make_lm(model: GPT, tokenizer: Tokenizer, batch_size: int, max_length: int):
    """GPTLM as an lm_eval.api.model.TemplateLM. A mixin, so that this file imports lm-eval (the optional `eval`
    extra) only when tasks run."""
    from lm_eval.api.model import TemplateLM

    if tokenizer.bos_id is None and tokenizer.eos_id is None:
        raise InputError("lm-eval needs a bos or eos token to condition a text's first token on; "
                         "tokenizer_config.json names neither")
    return type("GPTLM", (GPTLM, TemplateLM), {})(model, tokenizer, batch_size, max_length)


class GPTLM:
    """Our model as an lm-eval TemplateLM, whose loglikelihood tokenises (context, continuation) pairs and calls
    _loglikelihood_tokens. The semantics are those of lm-eval's HFLM (lm_eval/models/huggingface.py), so the two
    agree on the same weights (tests/test_evaluate.py): inputs left-truncated to max_length, a text's first token
    conditioned on bos (eos without one), generation cut at the `until` strings and at the eos token's text."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int, max_length: int, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self._device = model.embed.weight.device

    @property
    def device(self) -> torch.device:  # lm-eval's LM has this property only from 0.4.12 on
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As HFLM.tok_encode (with its default add_bos_token=None): the tokenizer's own special tokens, unless the
        # text starts with the prefix token's text (bos, or eos when there is no bos)
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        if add_special_tokens:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, bos=False, eos=False)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: (strings, context ids, continuation ids) -> (log p(continuation | context), is it greedy)."""
        from lm_eval.models.utils import Collator

        # longest first (as HFLM): the first batch shows at once whether memory suffices
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for batch in collator.get_batched(n=self.batch_size):
                # the model reads context + continuation but its last token, left-truncated to max_length
                inputs = [(context + continuation)[-(self.max_length + 1):-1] for _, context, continuation in batch]
                x = self.model.trunk(right_pad(inputs).to(self.device))  # (B, T, n_embd)
                # Only the continuations' positions (each row's last len(continuation)) go through the head, HEAD_ROWS
                # at a time: is_greedy needs each one's argmax, so the log-probabilities come from the same logits.
                lengths = [len(continuation) for _, _, continuation in batch]
                rows = torch.cat([torch.arange(len(inp) - n, len(inp)) + b * x.shape[1]
                                  for b, (inp, n) in enumerate(zip(inputs, lengths))]).to(self.device)
                targets = torch.tensor([t for _, _, continuation in batch for t in continuation], device=self.device)
                x = x.flatten(0, 1)  # (B * T, n_embd)
                logprobs, greedy = [], []
                for start in range(0, max(len(rows), 1), HEAD_ROWS):  # once at least: empty continuations score 0
                    logits = self.model.head(x[rows[start:start + HEAD_ROWS]])  # (<= HEAD_ROWS, vocab_size)
                    # log_softmax in float32 at least, and the argmax of its result, as HFLM
                    logp = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
                    chunk = targets[start:start + HEAD_ROWS]
                    logprobs.append(logp.gather(1, chunk[:, None]).squeeze(1))
                    greedy.append(logp.argmax(dim=-1) == chunk)
                for lp, g in zip(torch.cat(logprobs).split(lengths), torch.cat(greedy).split(lengths)):
                    results.append((lp.sum().item(), bool(g.all())))
                bar.update(len(batch))
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, in disjoint windows of max_length predictions, each with full context.

        Exactly as HFLM.loglikelihood_rolling (lm-eval 0.4.10 to 0.4.13): the text is tok_encode(text), the
        tokenizer's own encoding, and get_rolling_token_windows puts prefix_token_id (bos, else eos) before it. So a
        tokenizer that adds a bos (Llama, TinyLlama, ours from data_prep/train_tokenizer.py) has its first window read
        [bos, bos, t1, ...] and the text's loglikelihood include log p(bos | bos); one that adds none (SmolLM2,
        Qwen2.5) reads [bos, t1, ...] and scores the text's tokens only. We keep that quirk so that the harness's
        word and byte perplexities equal what its HF backend reports for the same model.
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
        from lm_eval.models.utils import postprocess_generated_text

        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        # batches share their generation kwargs; longest prompt first
        collator = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for batch in collator.get_batched(n=self.batch_size):
                contexts, gen_kwargs = zip(*batch)
                kwargs = normalize_gen_kwargs(gen_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = kwargs.pop("max_gen_toks")
                if max_gen_toks >= self.max_length:
                    raise InputError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length "
                                     f"{self.max_length}")
                # prompts keep their last max_length - max_gen_toks tokens, so generation always fits
                prompts = [self.tok_encode(c)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
                           for c in contexts]
                generated = [[] for _ in prompts]

                def stop_at_until(row: int, token: int) -> bool:
                    generated[row].append(token)
                    text = self.tokenizer.decode(generated[row])
                    return any(s and s in text for s in until)

                temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
                outputs = generate(self.model, prompts, max_gen_toks, stop_ids=self.tokenizer.stop_ids,
                                   on_token=stop_at_until, temperature=temperature, top_k=kwargs.get("top_k"),
                                   top_p=kwargs.get("top_p") or 1.0)
                for ids in outputs:
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    results.append(postprocess_generated_text(text, until, think_end_token=None))
                bar.update(len(batch))
        return collator.get_original(results)


def report(results: dict[str, dict], out: Path | None, tasks: bool) -> None:
    """One checkpoint: its JSON (perplexity) or lm-eval's table (tasks). Several: a row each."""
    result = next(iter(results.values())) if len(results) == 1 else results
    if len(results) > 1:
        print_table([{"checkpoint": name, **(task_metrics(r) if tasks else
                                             {k: r[k] for k in ("loss", "perplexity", "tokens")})}
                     for name, r in results.items()])
    elif tasks:
        from lm_eval.utils import make_table
        print(make_table(result) + (make_table(result, "groups") if result.get("groups") else ""))
    else:
        print(json.dumps(result, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def task_metrics(result: dict) -> dict:
    """{"task metric": value} of lm-eval's results, stderr left out."""
    return {f"{task} {metric.split(',')[0]}": value for task, metrics in result["results"].items()
            for metric, value in metrics.items() if isinstance(value, float) and "_stderr" not in metric}


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{row.get(c, ''):.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, ["-" * w for w in widths], *cells]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def gather_nargs(argv: list[str]) -> list[str]:
    """jsonargparse takes one value per flag: turn `--data a b` (as a shell glob expands) into `--data ["a", "b"]`."""
    args, i = [], 0
    while i < len(argv):
        args.append(argv[i])
        i += 1
        if args[-1] in LIST_FLAGS:
            j = i
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            args += [json.dumps(argv[i:j])] if j - i > 1 else argv[i:j]
            i = j
    return args


if __name__ == "__main__":
    # No TF32 matmuls (generate.py allows them): in 32-true the scores match lm-eval's HF backend on the same weights
    try:
        CLI(main, args=gather_nargs(sys.argv[1:]), exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
