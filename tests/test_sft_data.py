"""sft_data.py: the token ids, the assistant-only labels and the rendered text that transformers' apply_chat_template
gives on the same files, the Alpaca prompt, the record formats, truncation, the val split, errors and batching."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from checkpoint import copy_tokenizer_files
from sft_data import (GENERATION_TAG, IGNORE_INDEX, DataError, collate, count_targets, encode_prompt, format_prompt,
                      load_sft_data, resolve_style)
from tokenizer import Tokenizer

# ChatML with {% generation %} around what the assistant writes, its end-of-turn token included; bos written by the
# template itself. '\n' goes through {{ }} because trim_blocks eats a newline written right after a block tag.
TAGGED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief. «quoted»"}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! naïve café"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4, 日本語 🙂"}]
CORPUS = ["Hello world! the quick brown fox jumps over the lazy dog", "What is 2+2? It is 4.",
          "Below is an instruction that describes a task. ### Response:", "naïve café 日本語 🙂 «quoted»"]


def make_tokenizer(path, chat_template: str | None = None, post_processor_bos: bool = True) -> Tokenizer:
    """A byte-level BPE with ChatML's special tokens; its post-processor adds bos, which a rendered chat must not get
    (transformers encodes the template's output with add_special_tokens=False)."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(path)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def expected_labels(ids: list[int], mask: list[int]) -> list[int]:
    # Our convention: labels[t] is the target of position t, i.e. token t + 1, kept where that token is assistant text
    return [i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:])]


def test_generation_tags_match_transformers(tmp_path):
    from transformers import AutoTokenizer
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.render_chat(MESSAGES, add_generation_prompt=False)[0] == theirs.apply_chat_template(MESSAGES,
                                                                                                 tokenize=False)
    ref = theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    train, _, stats = load_sft_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}]), tok)
    ex = train[0]
    assert ex["input_ids"].tolist() == ref["input_ids"][:-1]
    assert ex["labels"].tolist() == expected_labels(ref["input_ids"], ref["assistant_masks"])
    assert ref["input_ids"].count(tok.bos_id) == 1  # the template's bos, not a second one from the post-processor
    # Both replies and both of their end-of-turn tokens are learned, nothing else
    targets = tok.decode(ex["labels"][ex["labels"] != IGNORE_INDEX].tolist())
    assert targets == "".join(m["content"] + "<|im_end|>" for m in MESSAGES if m["role"] == "assistant")
    assert stats["train_targets"] == count_targets(collate([ex]))
    # A prompt for generation ends where the first reply's targets start
    prompt = encode_prompt(MESSAGES[:2], tok)
    assert prompt == theirs.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    assert ex["input_ids"][:len(prompt)].tolist() == prompt and ex["labels"][len(prompt) - 1] != IGNORE_INDEX
    assert (ex["labels"][:len(prompt) - 1] == IGNORE_INDEX).all()


@pytest.mark.real_model
def test_smollm2_template(tmp_path, smollm2_hf_dir):
    """SmolLM2's own template has no {% generation %}: the prefix construction must give the tokens that an
    independent token-level construction gives, and the mask transformers gives for a tagged copy of the template."""
    from transformers import AutoTokenizer
    (tmp_path / "plain").mkdir()
    copy_tokenizer_files(smollm2_hf_dir, tmp_path / "plain")
    tok, theirs = Tokenizer(tmp_path / "plain"), AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert tok.chat_template is not None and not GENERATION_TAG.search(tok.chat_template)
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in tok.chat_template  # the tagged copy below wraps this expression's assistant part
    tagged = tok.chat_template.replace(turn, (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}" + turn + "{% endif %}"))
    (tmp_path / "tagged").mkdir()
    copy_tokenizer_files(tmp_path / "plain", tmp_path / "tagged")
    (tmp_path / "tagged" / "chat_template.jinja").write_text(tagged, encoding="utf-8")
    tok_tagged = Tokenizer(tmp_path / "tagged")
    im_end = tok.token_to_id("<|im_end|>")

    for messages in (MESSAGES, MESSAGES[1:]):  # with a system turn, and without (the template adds its own)
        text = theirs.apply_chat_template(messages, tokenize=False)
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == text
        assert tok_tagged.apply_chat_template(messages, add_generation_prompt=False) == text
        ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
        # Independent construction, in tokens: each reply is what its turn adds after the generation prompt
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before = theirs.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False)
                after = theirs.apply_chat_template(messages[:i + 1], return_dict=False)
                assert ids[:len(after)] == after and after[:len(before)] == before
                mask[len(before):len(after)] = [1] * (len(after) - len(before))
        ref = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                         chat_template=tagged)
        assert ref["input_ids"] == ids and ref["assistant_masks"] == mask

        path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
        for ours in (tok, tok_tagged):
            ex = load_sft_data(path, ours)[0][0]
            assert ex["input_ids"].tolist() == ids[:-1]
            assert ex["labels"].tolist() == expected_labels(ids, mask)
            # Each reply's <|im_end|> is learned; the system's and users' are not
            n_replies = sum(m["role"] == "assistant" for m in messages)
            assert (ex["labels"] == im_end).sum() == n_replies < (ex["input_ids"] == im_end).sum()


# The prompts of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
STANFORD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@pytest.mark.parametrize("post_processor_bos", [False, True])
def test_alpaca_style(tmp_path, post_processor_bos):
    tok = make_tokenizer(tmp_path / "tok", chat_template=None, post_processor_bos=post_processor_bos)
    assert resolve_style(tok, "auto") == "alpaca"
    records = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "It is 4."},
               {"instruction": "Greet the fox.", "output": "Hello world!"},
               {"instruction": "Greet the dog.", "input": "", "output": "Hello dog!"}]
    train, _, stats = load_sft_data(write_jsonl(tmp_path / "a.jsonl", records), tok)
    assert stats["train"] == 3 and stats["dropped"] == 0
    for record, ex in zip(records, train, strict=True):
        prompt = (STANFORD_INPUT if record.get("input") else STANFORD_NO_INPUT).format(**record)
        if not record.get("input"):
            assert format_prompt(record["instruction"], tok) == prompt
        # One bos, as a pretraining document starts, whatever the post-processor does; eos after the response
        tokens = [tok.bos_id, *tok.encode(prompt + record["output"], bos=False, eos=False), tok.eos_id]
        assert ex["input_ids"].tolist() == tokens[:-1]
        n_prompt = len(tok.encode(prompt, bos=True, eos=False))
        assert tokens[:n_prompt] == tok.encode(prompt, bos=True, eos=False)  # the prompt tokenises the same alone
        # Prompt targets masked; the response and eos learned
        assert (ex["labels"][:n_prompt - 1] == IGNORE_INDEX).all()
        assert ex["labels"][n_prompt - 1:].tolist() == tokens[n_prompt:]
        assert tok.decode(ex["labels"][n_prompt - 1:].tolist()) == record["output"] + "</s>"
        if not record.get("input"):  # what a finetuning script feeds the model to sample from
            assert encode_prompt(record["instruction"], tok) == tokens[:n_prompt]
    # Chat records of one exchange read as instruction + output; longer ones need a chat template
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES[1:3]}])
    alpaca = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Hi there", "output": "Hello! naïve café"}])
    assert torch.equal(load_sft_data(chat, tok)[0][0]["input_ids"], load_sft_data(alpaca, tok)[0][0]["input_ids"])
    with pytest.raises(DataError, match=r"c\.jsonl:1: the alpaca prompt style takes one user and one assistant"):
        load_sft_data(write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}]), tok)
    with pytest.raises(DataError, match="no chat template"):
        load_sft_data(chat, tok, prompt_style="chat_template")


def test_alpaca_records_through_a_chat_template(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    assert resolve_style(tok, "auto") == "chat_template"
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "It is 4."},
              {"instruction": "Greet the fox.", "output": "Hello world!"}]
    chat = [{"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                          {"role": "assistant", "content": "It is 4."}]},
            {"messages": [{"role": "user", "content": "Greet the fox."},
                          {"role": "assistant", "content": "Hello world!"}]}]
    a = load_sft_data(write_jsonl(tmp_path / "a.jsonl", alpaca), tok)[0]
    c = load_sft_data(write_jsonl(tmp_path / "c.jsonl", chat), tok)[0]
    for x, y in zip(a, c, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    # and the plain alpaca style on the same tokenizer, when asked for, differs
    assert not torch.equal(load_sft_data(tmp_path / "a.jsonl", tok, prompt_style="alpaca")[0][0]["input_ids"],
                           a[0]["input_ids"])


def test_formats_are_detected_and_sharegpt_is_mapped(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in MESSAGES]}]
    (tmp_path / "s.json").write_text(json.dumps(sharegpt, indent=2))  # a JSON list, not JSON lines
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi there", "output": "Hello! naïve café"}])
    train, _, stats = load_sft_data([tmp_path / "s.json", chat, alpaca], tok)
    assert stats["examples"] == len(train) == 3
    assert torch.equal(train[0]["input_ids"], train[1]["input_ids"]) and torch.equal(train[0]["labels"],
                                                                                      train[1]["labels"])
    # the alpaca record is the first exchange without the system turn
    single = load_sft_data(write_jsonl(tmp_path / "one.jsonl", [{"messages": MESSAGES[1:3]}]), tok)[0][0]
    assert torch.equal(train[2]["input_ids"], single["input_ids"])
    with pytest.raises(DataError, match=r"o\.jsonl:1: expected a record with 'messages'.*\['prompt'\]"):
        load_sft_data(write_jsonl(tmp_path / "o.jsonl", [{"prompt": "x"}]), tok)


def test_mask_prompt_false_trains_on_everything(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}])
    masked, full = (load_sft_data(path, tok, mask_prompt=m)[0][0] for m in (True, False))
    assert torch.equal(masked["input_ids"], full["input_ids"])
    assert (full["labels"] != IGNORE_INDEX).all() and torch.equal(full["labels"][:-1], full["input_ids"][1:])
    assert (masked["labels"] == IGNORE_INDEX).any()


def test_truncation_and_dropping(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    long_reply = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! " * 50}]}
    long_prompt = {"messages": [{"role": "user", "content": "Hi " * 50}, {"role": "assistant", "content": "Hello!"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [short, long_reply, long_prompt])
    full, _, stats = load_sft_data(path, tok)
    assert stats["truncated"] == stats["dropped"] == 0
    T = len(full[0]["input_ids"])
    assert len(full[1]["input_ids"]) > T and len(full[2]["input_ids"]) > T
    cut, val, stats = load_sft_data(path, tok, max_seq_length=T)
    assert len(cut) == 2 and len(val) == 0 and stats["truncated"] == 1 and stats["dropped"] == 1
    assert stats["examples"] == stats["train"] + stats["val"] + stats["dropped"]
    assert torch.equal(cut[0]["input_ids"], full[0]["input_ids"])  # not cut: exactly T long
    for key in ("input_ids", "labels"):  # the long reply keeps its start
        assert torch.equal(cut[1][key], full[1][key][:T])


def test_val_split_is_deterministic(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    records = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", records)

    def split(seed):
        train, val, stats = load_sft_data(path, tok, val_split=0.25, seed=seed)
        assert stats["train"] == len(train) == 30 and stats["val"] == len(val) == 10
        train_, val_ = ({tuple(x["input_ids"].tolist()) for x in d} for d in (train, val))
        assert len(train_ | val_) == 40 and not train_ & val_
        return val_

    assert split(0) == split(0) != split(1)
    other = write_jsonl(tmp_path / "v.jsonl", records[:3])
    assert len(load_sft_data(path, tok, val_paths=other)[1]) == 3
    with pytest.raises(DataError, match="not both"):
        load_sft_data(path, tok, val_paths=other, val_split=0.1)


def test_bad_data_names_file_and_line(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    good = json.dumps({"instruction": "a", "output": "b"})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(f"{good}\n\n{{\"instruction\": \"a\", \"output\": \n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad_json))}:3: invalid JSON .*expected one JSON object"):
        load_sft_data(bad_json, tok)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=rf"^{re.escape(missing)}:2: expected field 'output'"):
        load_sft_data(missing, tok)
    # a JSON list: records are named by the line they start on
    listed = tmp_path / "list.json"
    listed.write_text("[\n  " + ",\n  ".join([good, good, json.dumps({"messages": [{"role": "user"}]})]) + "\n]\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(listed))}:4: expected field 'instruction'"):
        load_sft_data(listed, tok)  # the first record made it an alpaca file
    listed.write_text("[\n" + json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot"}]}) + "\n]")
    with pytest.raises(DataError, match=r":2: messages\[1\]: expected field 'role' in"):
        load_sft_data(listed, tok)
    listed.write_text(f"[\n{good},\n{good[:-1]}\n]")
    with pytest.raises(DataError, match=r"list\.json:3: invalid JSON in the record starting here .* at line 4"):
        load_sft_data(listed, tok)


def test_collate_pads_right(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", TAGGED_TEMPLATE)
    records = [{"instruction": "Hi", "output": "Hello!"}, {"instruction": "Hi there, what is 2+2?", "output": "4"}]
    train = load_sft_data(write_jsonl(tmp_path / "a.jsonl", records), tok)[0]
    assert train.pad_id == tok.token_to_id("<unk>")  # tokenizer_config.json's pad_token
    batch = collate([train[0], train[1]], pad_id=train.pad_id, pad_to_multiple=8)
    lengths = [len(x["input_ids"]) for x in train]
    B, T = batch["input_ids"].shape
    assert B == 2 and T % 8 == 0 and max(lengths) <= T < max(lengths) + 8
    for i, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][i, :n], train[i]["input_ids"])
        assert torch.equal(batch["labels"][i, :n], train[i]["labels"])
        assert (batch["input_ids"][i, n:] == train.pad_id).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert count_targets(batch) == sum(count_targets({"labels": x["labels"]}) for x in train) > 0
