"""Our Tokenizer gives the ids and chat prompts that transformers.AutoTokenizer gives on the same files."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from model import InputError
from tokenizer import Tokenizer

TEXTS = ["Hello world!", "  leading spaces and\ttabs\n\nnewlines", "naïve café – ünïcödé 日本語 🙂",
         "<s>special</s> tokens written in text", "def f(x):\n    return x ** 2\n", ""]
TEMPLATE = (  # exercises what real templates use: bos_token, loop controls, tojson, raise_exception
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% if m['role'] == 'system' %}{{ m['content'] | tojson }}"
    "{% continue %}{% endif %}\n<|{{ m['role'] }}|>\n  {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief. «quoted»"}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


def make_tokenizer_dir(path, post_processor: bool, config: dict):
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TEMPLATE, **config)))
    (path / "generation_config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=[2, 0])))
    return path


@pytest.mark.parametrize("post_processor,config", [
    (True, {}),  # tokenizer.json's own post-processor adds bos
    # transformers 5 ignores these flags and follows the post-processor: so must we
    (True, {"add_bos_token": False, "tokenizer_class": "LlamaTokenizerFast"}),
    (False, {"add_bos_token": True, "add_eos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}),
    (False, {}),
])
def test_ids_equal_transformers(tmp_path, post_processor, config):
    from transformers import AutoTokenizer
    make_tokenizer_dir(tmp_path, post_processor, config)
    ours, theirs = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"])


def test_forcing_bos_and_eos(tmp_path):
    tok = Tokenizer(make_tokenizer_dir(tmp_path, False, {}))
    plain = tok.encode("Hello world!", bos=False, eos=False)
    assert tok.encode("Hello world!", bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]


def test_stop_ids_include_generation_config(tmp_path):
    tok = Tokenizer(make_tokenizer_dir(tmp_path, True, {}))
    assert tok.stop_ids == [0, 2]


@pytest.mark.parametrize("eos_token_id, expected", [(None, [2]), (0, [0, 2]), ("absent", [2])])
def test_generation_config_eos_may_be_null_one_id_or_absent(tmp_path, eos_token_id, expected):
    make_tokenizer_dir(tmp_path, True, {})
    config = {} if eos_token_id == "absent" else {"eos_token_id": eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert Tokenizer(tmp_path).stop_ids == expected  # tokenizer_config's eos_token </s> (id 2) is always one


def test_generation_config_eos_of_the_wrong_type_is_a_one_line_error(tmp_path):
    make_tokenizer_dir(tmp_path, True, {})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(InputError, match="generation_config.json: eos_token_id must be a token id"):
        Tokenizer(tmp_path)


def test_chat_template_equals_transformers(tmp_path):
    from transformers import AutoTokenizer
    make_tokenizer_dir(tmp_path, True, {})
    ours, theirs = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(InputError, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="tokenizer.json"):
        Tokenizer(tmp_path)
