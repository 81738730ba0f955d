"""Supervised finetuning data for finetune_full.py, finetune_lora.py and distill.py: instruction and chat records ->
token ids and next-token labels, all read, checked and tokenised when the dataset is built, so that bad data fails
before the first step and never mid-run.

Formats, detected per file from its first record; a file is a JSON list of records or JSON lines:
    alpaca    {"instruction": ..., "input": ... (optional), "output": ...}
    chat      {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
    sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}

Prompt styles: "chat_template" renders with the tokenizer's own template exactly as transformers'
apply_chat_template does (no special tokens added beyond what the template writes); "alpaca" is the classic
Alpaca prompt for base models, as [bos] + prompt + response + [eos], the shape of a pretraining document;
"auto" is the chat template when the tokenizer has one, else alpaca. Special tokens come from the tokenizer files.

Convention: an example is {"input_ids": (T,), "labels": (T,)} with input_ids = tokens[:-1] and labels = tokens[1:],
so labels[t] is the target of the logits at position t. Targets outside the assistant's text are IGNORE_INDEX; that
text includes the end-of-turn token (or eos, for alpaca) that the model must learn to emit. The loss of a step is
    model(input_ids, targets=labels)  (the cross entropy summed over the targets that are not IGNORE_INDEX)
summed over its micro-batches and divided by the target tokens of the whole step (count_targets).
"""

import bisect
import json
import re
from pathlib import Path

import jinja2
import torch
from torch.utils.data import Dataset

from model import IGNORE_INDEX, InputError
from tokenizer import Tokenizer

PROMPT_STYLES = ("auto", "chat_template", "alpaca")
# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers tells a template supports masks


class DataError(InputError):
    """Bad SFT data, as `file:line: what was expected`; a InputError, so scripts print it as one line."""


class SFTDataset(Dataset):
    def __init__(self, examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
        # Kept compact, (tokens int32, is_target bool) of length T + 1; the int64 tensors are made per item
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, is_target = self.examples[i]
        tokens = tokens.long()
        return {"input_ids": tokens[:-1], "labels": tokens[1:].masked_fill(~is_target[1:], IGNORE_INDEX)}


def load_sft_data(paths: str | Path | list, tokenizer: Tokenizer, *, prompt_style: str = "auto",
                  mask_prompt: bool = True, max_seq_length: int | None = None, val_split: float = 0.0,
                  val_paths: str | Path | list | None = None, seed: int = 0) -> tuple[SFTDataset, SFTDataset, dict]:
    """Train and val datasets and counts. max_seq_length bounds T (the model's block_size): longer examples keep
    their start. val_split holds out that fraction of the records of `paths` (a fixed permutation by seed, drawn
    before tokenising so that the same records are held out whatever max_seq_length is); or give val_paths."""
    style = resolve_style(tokenizer, prompt_style)
    if val_paths and val_split:
        raise DataError("give val_split or val_paths, not both")
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")
    records = read_records(paths)
    records, val_records = (records, read_records(val_paths)) if val_paths else hold_out(records, val_split, seed)
    stats = dict(examples=len(records) + len(val_records), truncated=0, dropped=0)
    # The pad id is cosmetic (padded positions have IGNORE_INDEX labels and come after every real token)
    pad = next((i for i in (tokenizer.token_to_id(tokenizer.pad_token), tokenizer.eos_id) if i is not None), 0)
    train, val = SFTDataset([], pad), SFTDataset([], pad)
    for dataset, split in ((train, records), (val, val_records)):
        for record in split:
            example = encode_record(*record, tokenizer, style, mask_prompt, max_seq_length, stats)
            if example is not None:
                dataset.examples.append(example)
    if not train:
        raise DataError(f"{paths}: no training examples left (read {stats['examples']}, dropped {stats['dropped']})")
    stats.update(train=len(train), val=len(val), train_tokens=sum(len(t) - 1 for t, _ in train.examples),
                 train_targets=sum(int(m[1:].sum()) for _, m in train.examples))
    return train, val, stats


def hold_out(records: list, val_split: float, seed: int) -> tuple[list, list]:
    """(train, val): val_split of the records (at least one, and never all) in a fixed permutation by seed, drawn
    before tokenising, so that the same records are held out whatever max_seq_length is."""
    n_val = min(max(1, round(len(records) * val_split)), len(records) - 1) if val_split else 0
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held_out], [r for i, r in enumerate(records) if i in held_out]


def resolve_style(tokenizer: Tokenizer, prompt_style: str) -> str:
    if prompt_style not in PROMPT_STYLES:
        raise DataError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if prompt_style == "auto":
        return "chat_template" if tokenizer.chat_template else "alpaca"
    if prompt_style == "chat_template" and not tokenizer.chat_template:
        raise DataError("prompt_style chat_template: this tokenizer has no chat template; use alpaca")
    return prompt_style


def read_records(paths: str | Path | list) -> list[tuple[str, list[dict], tuple[str, str] | None]]:
    """(where, messages, alpaca (instruction, input) or None) of every record, checked."""
    records = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path, fmt = Path(path), None
        for line, record in read_json_records(path):
            where = f"{path}:{line}"
            fmt = fmt or detect_format(record, where)
            records.append((where, *to_messages(record, fmt, where)))
        if fmt is None:
            raise DataError(f"{path}: no records; expected a JSON list of records or one JSON object per line")
    return records


def read_json_records(path: Path):
    """Yield (line, record) from a JSON list or a JSON lines file, whichever the first character says."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte order mark is not JSON
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not text.lstrip().startswith("["):
        for line, row in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold a raw \u2028
            if row.strip():
                try:
                    yield line, json.loads(row)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno}); "
                                    "expected one JSON object per line") from None
        return
    # A JSON list: decode one element at a time, so that a bad record can name its line
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos = counted = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    while True:
        pos = ws.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if text.startswith("]", pos):
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: invalid JSON in the record starting here ({e.msg} at line {e.lineno} "
                            f"column {e.colno}); expected a list of records") from None
        yield line, record
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' after a record")


def detect_format(record, where: str) -> str:
    for fmt, key in (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction")):
        if isinstance(record, dict) and key in record:
            return fmt
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: expected a record with 'messages' (chat), 'conversations' (ShareGPT) or "
                    f"'instruction' and 'output' (Alpaca), got {keys}")


def to_messages(record, fmt: str, where: str) -> tuple[list[dict], tuple[str, str] | None]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction, output = text_field(record, "instruction", where), text_field(record, "output", where)
        input = text_field(record, "input", where) if record.get("input") is not None else ""
        user = f"{instruction}\n\n{input}" if input else instruction  # the single user turn of a chat template
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], (instruction, input)
    key, role_key, content_key, roles = (("messages", "role", "content", CHAT_ROLES) if fmt == "chat" else
                                         ("conversations", "from", "value", SHAREGPT_ROLES))
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected field '{key}' to be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            got = turn.get(role_key) if isinstance(turn, dict) else turn
            raise DataError(f"{where}: {key}[{i}]: expected field '{role_key}' in {list(roles)}, got {got!r}")
        content = text_field(turn, content_key, f"{where}: {key}[{i}]")
        messages.append({"role": roles[turn[role_key]], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: expected at least one assistant turn to learn from")
    return messages, None


def text_field(record: dict, name: str, where: str) -> str:
    if not isinstance(record.get(name), str):
        raise DataError(f"{where}: expected field '{name}' (a string), got {record.get(name)!r:.40}")
    return record[name]


def encode_record(where: str, messages: list[dict], alpaca: tuple[str, str] | None, tokenizer: Tokenizer,
                  style: str, mask_prompt: bool, max_seq_length: int | None,
                  stats: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    tokens, is_target = encode_chat(where, messages, tokenizer) if style == "chat_template" else \
        encode_alpaca(where, messages, alpaca, tokenizer)
    if not mask_prompt:
        is_target[:] = True
    cut = max_seq_length is not None and len(tokens) > max_seq_length + 1
    if cut:
        tokens, is_target = tokens[:max_seq_length + 1], is_target[:max_seq_length + 1]
    if not is_target[1:].any():  # nothing to learn (e.g. the prompt alone fills max_seq_length)
        stats["dropped"] += 1
        return None
    stats["truncated"] += cut  # so that examples = train + val + dropped, and truncated counts kept examples
    return tokens, is_target


def encode_chat(where: str, messages: list[dict], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        text, spans = tokenizer.render_chat(messages, add_generation_prompt=False)
        if not GENERATION_TAG.search(tokenizer.chat_template):
            # Any template: an assistant message is what rendering it adds to the prefix before it plus the
            # generation prompt. That includes the end-of-turn token, which the model must learn to emit, and
            # whatever the turn writes after it (ChatML's newline): harmless, as generation stops at the former.
            spans = []
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
                    after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
                    if not (after.startswith(before) and text.startswith(after)):
                        spans = None
                        break
                    spans.append((len(before), len(after)))
    except (jinja2.TemplateError, InputError) as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    if spans is None:
        raise DataError(f"{where}: the chat template does not render this conversation as growing prefixes, so the "
                        f"assistant turns cannot be found; wrap them in {{% generation %}} blocks in the template")
    # As transformers' apply_chat_template(tokenize=True): the rendered text, no special tokens added
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    return torch.tensor(encoding.ids, dtype=torch.int32), overlaps(encoding.offsets, spans, len(text))


def encode_alpaca(where: str, messages: list[dict], alpaca: tuple[str, str] | None,
                  tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    if alpaca is None:  # a chat record, which the alpaca prompt can hold when it is one instruction and one reply
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: the alpaca prompt style takes one user and one assistant turn; "
                            "multi-turn data needs a tokenizer with a chat template")
        alpaca = (messages[0]["content"], "")
    if tokenizer.eos_id is None:
        raise DataError("the alpaca prompt style ends each response with eos; the tokenizer files name none")
    prompt = alpaca_prompt(*alpaca)
    text = prompt + messages[-1]["content"]
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tokens = torch.tensor([*bos, *encoding.ids, tokenizer.eos_id], dtype=torch.int32)
    response = overlaps(encoding.offsets, [(len(prompt), len(text))], len(text))
    is_target = torch.cat([torch.zeros(len(bos), dtype=torch.bool), response, torch.ones(1, dtype=torch.bool)])
    return tokens, is_target


def overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n_chars: int) -> torch.Tensor:
    """Whether each token's characters overlap a span: the tokens transformers marks, from the token of a span's
    first character to the token of its last."""
    in_span = torch.zeros(n_chars + 1, dtype=torch.int32)
    for start, end in spans:
        in_span[start + 1:end + 1] = 1
    before = in_span.cumsum(0)  # before[k]: how many of the first k characters lie in a span
    offsets = torch.tensor(offsets, dtype=torch.long).view(-1, 2)
    return before[offsets[:, 1]] > before[offsets[:, 0]]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input) if input else \
        ALPACA_PROMPT.format(instruction=instruction)


def format_prompt(prompt: str | list[dict], tokenizer: Tokenizer, style: str = "auto") -> str:
    """The text a finetuned model continues: a user prompt (or messages) in the style it was trained on."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if resolve_style(tokenizer, style) == "chat_template":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if [m["role"] for m in messages] != ["user"]:
        raise DataError("the alpaca prompt style takes a single user prompt")
    return alpaca_prompt(messages[0]["content"])


def encode_prompt(prompt: str | list[dict], tokenizer: Tokenizer, style: str = "auto") -> list[int]:
    """Token ids of format_prompt, special tokens as in training: what the chat template writes, or bos + prompt."""
    text = format_prompt(prompt, tokenizer, style)
    if resolve_style(tokenizer, style) == "chat_template":
        return tokenizer.encode(text, bos=False, eos=False)
    return tokenizer.encode(text, bos=True, eos=False)


def collate(batch: list[dict], pad_id: int = 0, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to pad_to_multiple): input_ids with pad_id, labels with
    IGNORE_INDEX. Causal attention never lets a real token see the padding after it, so no attention mask."""
    T = max(len(x["input_ids"]) for x in batch)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(batch):
        input_ids[i, :len(x["input_ids"])] = x["input_ids"]
        labels[i, :len(x["labels"])] = x["labels"]
    return {"input_ids": input_ids, "labels": labels}  # (B, T) each


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `lengths`, grouped into rows whose lengths sum to at most capacity, each
    item going into the fullest row it still fits (a new row if none). Rows come fullest first; within a row the
    items keep their order. Within 22% of the fewest rows possible (11/9 OPT + 1), and every item exactly once."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row) ascending: the first that fits is the best fit
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"an item of length {lengths[i]} cannot fit a row of {capacity}")
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            rows.append([])
            space, row = capacity, len(rows) - 1
        else:
            space, row = free.pop(j)
        rows[row].append(i)
        bisect.insort(free, (space - lengths[i], row))
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: -sum(lengths[i] for i in r))


def collate_packed(rows: list[list[dict]], pad_id: int = 0, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of several examples each, concatenated, right-padded to the longest row (or to pad_to: a fixed shape for
    compiled kernels): input_ids, labels and doc_ids (B, T), for model(input_ids, targets=labels, doc_ids=doc_ids).
    Each example brings its own labels (its next tokens), so no label ever predicts the next example's first token;
    the padding is one more document, with IGNORE_INDEX labels."""
    T = max(sum(len(x["input_ids"]) for x in row) for row in rows)
    T = max(T, pad_to or 0)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.empty((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for d, x in enumerate(row):
            end = start + len(x["input_ids"])
            input_ids[b, start:end], labels[b, start:end], doc_ids[b, start:end] = x["input_ids"], x["labels"], d
            start = end
        doc_ids[b, start:] = len(row)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}


def packed_micro_batches(examples: list[dict], rows_per_batch: int, row_length: int, pad_id: int = 0,
                         fixed_rows: bool = False) -> list[dict[str, torch.Tensor]]:
    """One rank's examples of an optimizer step packed, best-fit decreasing, into rows of row_length tokens, and
    collated rows_per_batch rows at a time: at most the padded run's micro-batches, and never more tokens in one.
    fixed_rows: each row padded to row_length, (rows_per_batch, row_length), the one shape a compiled kernel is built
    for; otherwise a micro-batch's rows end to end in a single row, (1, its tokens): no padding at all."""
    rows = pack([len(x["input_ids"]) for x in examples], row_length)
    groups = [rows[j:j + rows_per_batch] for j in range(0, len(rows), rows_per_batch)]
    if fixed_rows:
        return [collate_packed([[examples[i] for i in row] for row in group], pad_id, row_length) for group in groups]
    return [collate_packed([[examples[i] for row in group for i in row]], pad_id) for group in groups]


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Unmasked target tokens: sum this over the micro-batches of an optimizer step to normalise its loss."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
