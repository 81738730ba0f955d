"""The tokenizer of a checkpoint directory: tokenizer.json through `tokenizers`, plus what
tokenizer_config.json and generation_config.json add (bos/eos, whether to add them, stop tokens, the
chat template). Token ids equal `transformers.AutoTokenizer` on the same files (tests/test_tokenizer.py).
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from checkpoint import read_json
from model import InputError


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path):
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{path}: not found; every checkpoint directory needs the tokenizer.json of its model")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception
            raise InputError(f"{path}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
        config = read_json(checkpoint_dir / "tokenizer_config.json", missing_ok=True)
        generation = read_json(checkpoint_dir / "generation_config.json", missing_ok=True)

        self.bos_token = token_content(config.get("bos_token"))
        self.eos_token = token_content(config.get("eos_token"))
        self.pad_token = token_content(config.get("pad_token"))
        self.unk_token = token_content(config.get("unk_token"))
        self.bos_id = self.token_to_id(self.bos_token)
        self.eos_id = self.token_to_id(self.eos_token)

        # Generation stops at any of these: generation_config.json may list several (Llama 3's <|eot_id|>)
        eos_ids = generation.get("eos_token_id")  # an id, a list of ids, or null / absent (none: the eos alone)
        eos_ids = eos_ids if isinstance(eos_ids, list) else [] if eos_ids is None else [eos_ids]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise InputError(f"{checkpoint_dir / 'generation_config.json'}: eos_token_id must be a token id, a "
                             f"list of them or null, got {generation['eos_token_id']!r}")
        self.stop_ids = sorted({*eos_ids, *([self.eos_id] if self.eos_id is not None else [])})
        self.chat_template = load_chat_template(checkpoint_dir, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of text. bos and eos None: what tokenizer.json's post-processor adds. transformers 5 does
        exactly that and ignores tokenizer_config.json's add_bos_token/add_eos_token (checked for the
        generic, Llama, Gemma and Qwen2 tokenizer classes). True/False: the plain encoding with bos/eos as asked."""
        if bos is None and eos is None:
            return self.backend.encode(text, add_special_tokens=True).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's own template, as transformers' apply_chat_template(tokenize=False)."""
        return self.render_chat(messages, add_generation_prompt, **kwargs)[0]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool,
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the character spans of its {% generation %} blocks (the assistant's text, from
        which transformers' apply_chat_template(return_assistant_tokens_mask=True) builds its mask)."""
        if self.chat_template is None:
            raise InputError("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        # transformers passes its special_tokens_map; templates read these four
        context = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                       pad_token=self.pad_token or "", unk_token=self.unk_token or "", tools=None, documents=None)
        return render_with_spans(compile_template(self.chat_template), messages=messages,
                                 add_generation_prompt=add_generation_prompt, **{**context, **kwargs})


@lru_cache(maxsize=8)  # SFT data renders every conversation with the same template: compile it once
def compile_template(source: str) -> jinja2.Template:
    # The environment transformers renders chat templates in: sandboxed, trimmed blocks, loop controls,
    # {% generation %} blocks, tojson without ASCII escaping, and the two helpers templates call.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class GenerationTracker(Extension):
    """{% generation %}...{% endgeneration %} marks the text the assistant writes. The block renders its body
    unchanged; while render_with_spans renders, each block's character span is recorded. Same facts as
    transformers' AssistantTracker (utils/chat_template_utils.py), written afresh."""
    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self.rendered = None  # the output yielded so far while render_with_spans tracks, else None
        self.spans = []

    def parse(self, parser) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

    def _block(self, caller) -> str:
        text = caller()
        if self.rendered is not None:
            # The block starts where the output yielded so far ends, as in transformers. A block inside a macro or
            # a {% set %} capture would be misplaced by this; chat templates put it straight in the message loop.
            start = sum(map(len, self.rendered))
            self.spans.append((start, start + len(text)))
        return text


def render_with_spans(template: jinja2.Template, **context) -> tuple[str, list[tuple[int, int]]]:
    tracker = next(e for e in template.environment.extensions.values() if isinstance(e, GenerationTracker))
    tracker.rendered, tracker.spans = [], []
    try:
        for piece in template.generate(**context):  # generate, not render: the tracker sees the output so far
            tracker.rendered.append(piece)
        return "".join(tracker.rendered), tracker.spans
    finally:
        tracker.rendered = None


def raise_template_error(message: str):
    raise InputError(f"chat template: {message}")


def load_chat_template(checkpoint_dir: Path, config: dict) -> str | None:
    """transformers 5 saves the template as chat_template.jinja; older repos keep it in tokenizer_config.json
    (a string, or a list of named templates of which "default" is used) or in chat_template.json."""
    if (checkpoint_dir / "chat_template.jinja").is_file():
        return (checkpoint_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or read_json(checkpoint_dir / "chat_template.json", missing_ok=True).get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def token_content(token) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    return token.get("content") if isinstance(token, dict) else token
