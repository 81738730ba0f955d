"""Preference data for align.py: prompts with a chosen and a rejected completion (DPO and its family), or with one
completion labelled desirable or not (KTO) -> token ids, all read, checked and tokenised when the dataset is built,
so that bad data fails before the first step and never mid-run.

Records (a JSON list of them or JSON lines, as sft_data.py reads):
    pairs       {"prompt": ..., "chosen": ..., "rejected": ...}
    unpaired    {"prompt": ..., "completion": ..., "label": true | false}
where a prompt is a string (one user turn) or a list of chat messages, and a completion a string (one assistant turn),
an assistant message, or a list of assistant messages. Pairs may also come without a prompt, as whole conversations
(TRL's implicit-prompt form, e.g. UltraFeedback-binarized): the messages both start with are the prompt.
Rendered as sft_data.py renders a conversation: with the tokenizer's chat template (the prompt with the generation
prompt, then the completion up to and including its end-of-turn token), or in the Alpaca prompt for a base model (bos
+ prompt, then the response + eos).

Tokenised as TRL does: the rendered prompt and the rendered completion separately, then concatenated, so that the
chosen and rejected sequences of a pair share their prompt tokens exactly. Log-probs cover the completion only. A
sequence longer than max_seq_length + 1 tokens keeps the prompt's start and loses the completion's end; a pair whose
prompt leaves no room for a completion token is dropped. Both are counted.
"""

from pathlib import Path

import jinja2
import torch
from torch.utils.data import Dataset

from model import IGNORE_INDEX
from sft_data import DataError, alpaca_prompt, hold_out, read_json_records, resolve_style, text_field
from tokenizer import Tokenizer


class PreferenceDataset(Dataset):
    """Examples as int32 token tensors: (prompt, chosen, rejected) for pairs, (prompt, completion, label) unpaired."""

    def __init__(self, examples: list[tuple], pad_id: int, paired: bool):
        self.examples, self.pad_id, self.paired = examples, pad_id, paired
        self.kl_partners: list[int] = []  # unpaired: whose completion each example's KL row takes (kl_partners)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple:
        return self.examples[i]

    def collate(self, ids: list[int], max_seq_length: int) -> dict[str, torch.Tensor]:
        """The batch of examples `ids` (collate_preferences). An unpaired example's KL row takes its fixed partner's
        completion, whatever the batch, so a reference scores the same rows live or precomputed."""
        partners = None if self.paired else [self.examples[self.kl_partners[i]][1] for i in ids]
        return collate_preferences([self.examples[i] for i in ids], self.pad_id, max_seq_length,
                                   kl_completions=partners)


def load_preference_data(paths: str | Path | list, tokenizer: Tokenizer, *, prompt_style: str = "auto",
                         max_seq_length: int, val_split: float = 0.0, val_paths: str | Path | list | None = None,
                         seed: int = 0) -> tuple[PreferenceDataset, PreferenceDataset, dict]:
    """Train and val datasets, and counts. Every file holds the same kind of record (pairs or unpaired)."""
    style = resolve_style(tokenizer, prompt_style)
    records = read_preference_records(paths)
    records, val_records = ((records, read_preference_records(val_paths)) if val_paths
                            else hold_out(records, val_split, seed))
    kinds = {len(r[2]) for r in records + val_records}  # 2 completions: a pair; 1: unpaired
    if len(kinds) > 1:
        raise DataError(f"{paths}: pairs (prompt, chosen, rejected) and unpaired records (prompt, completion, "
                        "label) mixed; give one kind")
    paired = kinds == {2}
    pad = next((i for i in (tokenizer.token_to_id(tokenizer.pad_token), tokenizer.eos_id) if i is not None), 0)
    stats = dict(records=len(records) + len(val_records), truncated=0, dropped=0, identical=0)
    train, val = PreferenceDataset([], pad, paired), PreferenceDataset([], pad, paired)
    for dataset, split in ((train, records), (val, val_records)):
        for where, prompt, completions, label in split:
            example = encode_example(where, prompt, completions, label, tokenizer, style, max_seq_length, stats)
            if example is not None:
                dataset.examples.append(example)
    if not train:
        raise DataError(f"{paths}: no training examples left (read {stats['records']}, dropped {stats['dropped']} "
                        f"too long for max_seq_length {max_seq_length}, {stats['identical']} with chosen = rejected)")
    if not paired:
        train.kl_partners, val.kl_partners = kl_partners(train.examples, seed), kl_partners(val.examples, seed)
    stats.update(train=len(train), val=len(val), paired=paired)
    return train, val, stats


def kl_partners(examples: list[tuple], seed: int, max_skip: int = 64) -> list[int]:
    """Unpaired (KTO): for each example, the example whose completion its KL row puts after its prompt: the next one
    in a fixed shuffled order, skipping those with the same prompt (unpaired records often come from pairs, a
    prompt's two answers side by side, and a prompt with its own other answer is no mismatch). Fixed whatever the
    batch, so the reference's log-probs of the KL rows can be computed once."""
    n = len(examples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partners = [0] * n
    for k, i in enumerate(order):
        candidates = (order[(k + step) % n] for step in range(1, min(n, max_skip)))
        partners[i] = next((j for j in candidates if not torch.equal(examples[j][0], examples[i][0])),
                           order[(k + 1) % n])  # every nearby prompt the same: take the next one anyway
    return partners


def read_preference_records(paths: str | Path | list) -> list[tuple[str, list[dict], list[list[dict]], bool | None]]:
    """(where, prompt messages, completions as message lists (chosen, rejected) or (completion,), label) per record."""
    records = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path, seen = Path(path), False
        for line, record in read_json_records(path):
            where, seen = f"{path}:{line}", True
            if isinstance(record, dict) and "prompt" not in record and isinstance(record.get("chosen"), list):
                record = split_implicit_prompt(record, where)
            if not isinstance(record, dict) or "prompt" not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: expected a record with 'prompt' and 'chosen' and 'rejected' (pairs) or "
                                f"'completion' and 'label' (unpaired), got {keys}")
            prompt = to_prompt(record["prompt"], where)
            if "completion" in record or "label" in record:
                if not isinstance(record.get("label"), bool):
                    raise DataError(f"{where}: expected field 'label' (true or false), got {record.get('label')!r:.40}")
                records.append((where, prompt, [to_completion(record, "completion", where)], record["label"]))
            else:
                completions = [to_completion(record, key, where) for key in ("chosen", "rejected")]
                records.append((where, prompt, completions, None))
        if not seen:
            raise DataError(f"{path}: no records; expected a JSON list of records or one JSON object per line")
    return records


def split_implicit_prompt(record: dict, where: str) -> dict:
    """TRL's conversational form with an implicit prompt (UltraFeedback-binarized): chosen and rejected are whole
    conversations; the messages they share from the start are the prompt."""
    chosen, rejected = record["chosen"], record.get("rejected")
    if not isinstance(rejected, list):
        raise DataError(f"{where}: expected field 'rejected' to be a list of messages, as 'chosen' is")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1  # a shared assistant turn at the end belongs to the completions
    if shared == 0:
        raise DataError(f"{where}: expected 'prompt', or chosen and rejected conversations that start with the same "
                        "prompt messages")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def to_prompt(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: expected field 'prompt' to be a string or a non-empty list of messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            got = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where}: prompt[{i}]: expected field 'role' in ['system', 'user', 'assistant'], "
                            f"got {got!r:.40}")
        messages.append({"role": message["role"], "content": text_field(message, "content", f"{where}: prompt[{i}]")})
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; the completion is the assistant's turn")
    return messages


def to_completion(record: dict, key: str, where: str) -> list[dict]:
    value = record.get(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages or any(
            not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: expected field '{key}' (a string, or assistant messages), got {value!r:.40}")
    return [{"role": "assistant", "content": m["content"]} for m in messages]


def encode_example(where: str, prompt: list[dict], completions: list[list[dict]], label: bool | None,
                   tokenizer: Tokenizer, style: str, max_seq_length: int, stats: dict) -> tuple | None:
    """(prompt ids, completion ids...) with label for unpaired records; None (counted) when dropped."""
    if len(completions) == 2 and completions[0] == completions[1]:
        stats["identical"] += 1  # no preference to learn: DPO's gradient of a tie is zero
        return None
    prompt_text, texts = render(where, prompt, completions, tokenizer, style)
    bos = [tokenizer.bos_id] if style == "alpaca" and tokenizer.bos_id is not None else []
    prompt_ids = bos + tokenizer.backend.encode(prompt_text, add_special_tokens=False).ids
    eos = [tokenizer.eos_id] if style == "alpaca" else []
    completion_ids = [tokenizer.backend.encode(t, add_special_tokens=False).ids + eos for t in texts]
    room = max_seq_length + 1 - len(prompt_ids)  # input_ids are the sequence but its last token
    if room < 1 or not all(completion_ids):
        stats["dropped"] += 1
        return None
    stats["truncated"] += any(len(c) > room for c in completion_ids)
    parts = [torch.tensor(prompt_ids, dtype=torch.int32)] + [torch.tensor(c[:room], dtype=torch.int32)
                                                             for c in completion_ids]
    return (*parts, label) if label is not None else tuple(parts)


def render(where: str, prompt: list[dict], completions: list[list[dict]], tokenizer: Tokenizer,
           style: str) -> tuple[str, list[str]]:
    """The prompt's text and each completion's text after it, as SFT renders the whole conversation."""
    if style == "alpaca":
        if [m["role"] for m in prompt] != ["user"] or any(len(c) != 1 for c in completions):
            raise DataError(f"{where}: the alpaca prompt style takes one user prompt and one assistant reply; "
                            "multi-turn data needs a tokenizer with a chat template")
        if tokenizer.eos_id is None:
            raise DataError("the alpaca prompt style ends each response with eos; the tokenizer files name none")
        return alpaca_prompt(prompt[0]["content"]), [c[0]["content"] for c in completions]
    try:
        before = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        texts = []
        for completion in completions:
            full = tokenizer.apply_chat_template(prompt + completion, add_generation_prompt=False)
            if not full.startswith(before):
                raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the "
                                "conversation, so the completion cannot be found")
            texts.append(full[len(before):])
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    return before, texts


def collate_preferences(examples: list[tuple], pad_id: int, max_seq_length: int,
                        kl_completions: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One batch for one forward pass, right-padded: pairs as 2B rows, the B chosen then the B rejected sequences;
    unpaired as B rows plus B rows for the KL estimate, example i's prompt with kl_completions[i] (another prompt's
    completion: PreferenceDataset.collate passes each example's fixed partner), cut to max_seq_length, and `label`
    (B,). labels are IGNORE_INDEX but on completion tokens."""
    paired = not isinstance(examples[0][-1], bool)
    if paired:
        rows = [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples]
    else:
        if kl_completions is None:
            raise ValueError("unpaired examples need kl_completions for their KL rows (PreferenceDataset.collate)")
        mismatched = [(example[0], completion) for example, completion in zip(examples, kl_completions, strict=True)]
        rows = [(p, c) for p, c, _ in examples] + [(p, c[:max_seq_length + 1 - len(p)]) for p, c in mismatched]
    T = max(len(p) + len(c) for p, c in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        seq = torch.cat([prompt, completion]).long()
        input_ids[i, :len(seq) - 1] = seq[:-1]
        labels[i, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]  # position t predicts token t + 1
    batch = {"input_ids": input_ids, "labels": labels,
             "lengths": torch.tensor([len(p) + len(c) - 1 for p, c in rows])}  # (rows,): the tokens read, no padding
    if not paired:
        batch["label"] = torch.tensor([label for *_, label in examples])
    return batch
