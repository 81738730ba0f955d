"""Reward functions for grpo.py, with TRL's signature, so that a function written for TRL's GRPOTrainer runs here
unchanged and these run there:

    f(prompts, completions, completion_ids, **fields) -> list[float | None]

one value per completion. prompts[i] is the prompt completion i answers, as the record holds it (a string or chat
messages); completions[i] is the decoded text (for chat prompts, TRL's form: [{"role": "assistant", "content": text}]);
completion_ids[i] its token ids; every other field of the prompt's record arrives as a keyword argument holding one
value per completion (a record's "answer" as answer=[...]); grpo.py adds max_completion_length. None means "does not
apply to this completion": it is left out of that function's mean, and a completion no function scores is left out
of its group's baseline and gets no advantage (as TRL).

Name them on the command line as module:function (`--rewards '[rewards:final_number, rewards:strict_format]'`), or
path/to/file.py:function for your own.
"""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# a strict answer format: some reasoning, then the number alone on the last line
STRICT_FORMAT = re.compile(r"(?s)^(?:.*\n)?\s*-?\d[\d,]*(?:\.\d+)?\s*$")


def text_of(completion) -> str:
    """A completion's text, whether plain or TRL's chat form (a list of assistant messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def last_number(text: str) -> float | None:
    """The last number in text ("1,234" is 1234; "-7.5" is -7.5), or None."""
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:  # "1,2,3,": a run of commas is not a number
        return None


def final_number(prompts, completions, completion_ids, answer=None, **fields) -> list[float | None]:
    """1.0 when the completion's last number equals the record's `answer` (a number or a string holding one), else
    0.0; None for a record without an answer."""
    if answer is None:
        raise ValueError("final_number needs an 'answer' field in every prompt record")
    rewards = []
    for completion, expected in zip(completions, answer):
        target = None if expected is None else last_number(str(expected))
        if target is None:
            rewards.append(None)
            continue
        got = last_number(text_of(completion))
        rewards.append(1.0 if got is not None and abs(got - target) < 1e-9 else 0.0)
    return rewards


def strict_format(prompts, completions, completion_ids, **fields) -> list[float]:
    """1.0 when the completion ends with its answer, a number alone on the last line (STRICT_FORMAT), else 0.0."""
    return [1.0 if STRICT_FORMAT.match(text_of(c).strip()) else 0.0 for c in completions]


def length_penalty(prompts, completions, completion_ids, max_completion_length=None, **fields) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): 0 up to the last fifth of
    max_completion_length, then falling linearly to -1 at it: long answers cost before they are cut off."""
    if max_completion_length is None:
        raise ValueError("length_penalty needs max_completion_length (grpo.py passes it)")
    cache = max_completion_length // 5  # the soft zone's length
    start = max_completion_length - cache
    return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / max(cache, 1)) for ids in completion_ids]
