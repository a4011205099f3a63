"""Prompt templates, answer parsing and GRPO rewards (Med-R1 style).

Three prompt modes:

- ``think``: Med-R1's prompt, verbatim: reason inside ``<think>...</think>``, then the letter inside
  ``<answer>...</answer>``.
- ``nothink``: Med-R1's No-Thinking prompt, verbatim: only the letter inside ``<answer>...</answer>``.
- ``think_after``: Med-R1's later Think-After variant. Its exact wording is not in the material we
  have (PAPERS.md), so this project words it in the same style: the letter first inside
  ``<answer>...</answer>``, then the rationale inside ``<think>...</think>``. Its format regex is
  ``\\s*<answer>.*?</answer>\\s*<think>.*?</think>`` (full match, DOTALL).

The rewards follow TRL's reward-function form: ``f(completions, **kwargs) -> list[float]``;
dataset columns (``answer``, ``n_options`` or ``options``) arrive as keyword lists. Completions
may be plain strings or TRL's conversational form ``[{"role": "assistant", "content": ...}]``.
"""
from __future__ import annotations

import re
from typing import Any

MODES = ("think", "nothink", "think_after")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Med-R1's templates, verbatim (PAPERS.md). "{question}" is the formatted problem.
PROMPTS: dict[str, str] = {
    "think": (
        "{question} Your task: 1. Think through the question step by step, enclose your reasoning "
        "process in <think>...</think> tags. 2. Then provide the correct single-letter choice "
        "(A, B, C, D,...) inside <answer>...</answer> tags. 3. No extra information or text outside "
        "of these tags."
    ),
    "nothink": (
        "{question} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside "
        "<answer>...</answer> tags. 2. No extra information or text outside of this tag."
    ),
    # This project's wording of Med-R1's Think-After variant (see the module docstring).
    "think_after": (
        "{question} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside "
        "<answer>...</answer> tags. 2. Then explain the reasoning behind your choice step by step, "
        "enclosed in <think>...</think> tags. 3. No extra information or text outside of these tags."
    ),
}

# Med-R1's format regexes (full match, DOTALL); think_after is this project's analogue.
FORMAT_PATTERNS: dict[str, str] = {
    "think": r"<think>.*?</think>\s*<answer>.*?</answer>",
    "nothink": r"\s*<answer>.*?</answer>",
    "think_after": r"\s*<answer>.*?</answer>\s*<think>.*?</think>",
}

ANSWER_PREFIX = "<answer>"  # what an answer-first completion starts with (see models.option_logprobs)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# a letter alone or followed by a delimiter: "C", " C ", "(C)", "C.", "C)", "C: MRI", "c"
_LETTER_DELIM = re.compile(r"\s*\(?\s*([A-Za-z])\s*(?:[).:]|$)", re.DOTALL)
# an upper-case option letter (A-E) followed by text: "C MRI" ("a lesion", "I think" are words)
_LETTER_WORD = re.compile(r"\s*([A-E])\s+\S", re.DOTALL)


def _check_mode(mode: str) -> None:
    if mode not in PROMPTS:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {MODES}")


def format_problem(item: Any) -> str:
    """Med-R1's ``problem`` string: ``"{question} A)opt, B)opt, C)opt"``.

    ``item`` needs ``.question`` and ``.options`` (2-5 option texts, letters assigned in order).
    """
    options = list(item.options)
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"item {getattr(item, 'question_id', '?')}: needs >= 2 options, got {len(options)}")
    choices = ", ".join(f"{LETTERS[i]}){opt}" for i, opt in enumerate(options))
    return f"{item.question.strip()} {choices}"


def build_prompt(item: Any, mode: str) -> str:
    """The user text for ``item`` under prompt ``mode`` ("think", "nothink" or "think_after")."""
    _check_mode(mode)
    # str.replace, not str.format: questions may contain braces
    return PROMPTS[mode].replace("{question}", format_problem(item))


def format_completion(letter: str, mode: str, rationale: str | None = None) -> str:
    """The canonical target completion for SFT in ``mode``.

    The answer block is Med-R1's solution format ``"<answer> C </answer>"`` (letter between spaces),
    so an answer-first completion continues ``"<answer>"`` with the token ``" C"``.
    ``think``: ``"<think> {rationale} </think>\\n<answer> C </answer>"``; ``think_after``:
    ``"<answer> C </answer>\\n<think> {rationale} </think>"``; ``nothink``: the answer block only.
    """
    _check_mode(mode)
    letter = letter.strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise ValueError(f"answer must be a single letter, got {letter!r}")
    answer = f"{ANSWER_PREFIX} {letter} </answer>"
    if mode == "nothink":
        return answer
    if not rationale:
        raise ValueError(f"mode {mode!r} needs a non-empty rationale")
    think = f"<think> {rationale.strip()} </think>"
    return f"{think}\n{answer}" if mode == "think" else f"{answer}\n{think}"


def option_check(options, answer: str) -> str:
    """The closing step of this project's think rationales: every option judged in order, as
    ``A) text``; a wrong option is written only up to its first word that differs from the right
    option's: ``"Options: A) left no, B) right eye yes."``, ``"A) left frontal no, B) left occipital
    lobe yes, C) right no."``.

    Why: the letter then follows from the reasoning by local steps a small model can learn (copy
    each option from the prompt, judge it, answer with the letter judged "yes"), instead of one
    backward lookup from the finding's text to the letter in front of it, which the tiny model
    trained from scratch does not learn. Each verdict comes right after the word that decides it,
    so the model compares one word with the conclusion instead of a whole phrase; judged only at the
    phrase's end, options of several words that differ in one (``left`` / ``right occipital lobe``)
    were answered at chance. The space after ``)`` (the prompt has ``A)text``) makes the option's
    words the same tokens as the conclusion's (docs/lab_notes.md, What the tiny model
    needs to read the image, the truncated check); the glued form copies second words better and
    judges first words worse, and was no better over two seeds (the same paragraph)."""
    options = list(options)
    answer = answer.strip().upper()
    if answer not in LETTERS[:len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters")
    right = options[LETTERS.index(answer)].split()
    checks = []
    for letter, opt in zip(LETTERS, options):
        if letter == answer:
            checks.append(f"{letter}) {opt} yes")
            continue
        words = opt.split()
        same = 0
        while same < min(len(words), len(right)) and words[same] == right[same]:
            same += 1
        checks.append(f"{letter}) {' '.join(words[:same + 1])} no")
    return f"Options: {', '.join(checks)}."


def _letter_of(block: str) -> str | None:
    block = block.strip().strip("*`'\"").strip()  # markdown emphasis or quotes around the letter
    m = _LETTER_DELIM.match(block) or _LETTER_WORD.match(block)
    return m.group(1).upper() if m else None


def parse_answer(text: str, n_options: int | None = None) -> str | None:
    """The option letter inside ``<answer>...</answer>``, or None for "no valid answer".

    Tolerant of spaces, case and decoration: ``"<answer> C </answer>"``, ``"(C)"``, ``"C."``,
    ``"C) MRI"``, ``"C: MRI"``, ``"C MRI"``, ``"**C**"``, ``"c"`` all give ``"C"``; the block must start
    with the letter (``"I think C"``, ``"MRI"`` are not answers). Rules:

    - no complete ``<answer>...</answer>`` pair -> None (unlike Med-R1's code, the bare output is
      never taken as the answer);
    - several answer blocks: blocks without a letter are ignored; if the letters found disagree
      -> None; if they agree -> that letter;
    - a letter outside the item's options (index >= ``n_options``) -> None.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_answer expects a string, got {type(text).__name__}")
    letters = {letter for block in _ANSWER_TAG.findall(text) if (letter := _letter_of(block))}
    if len(letters) != 1:
        return None
    letter = letters.pop()
    if n_options is not None and LETTERS.index(letter) >= int(n_options):
        return None
    return letter


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or TRL's conversational ``[{"role", "content"}]`` form
    (content a string or a list of ``{"type": "text", "text": ...}`` blocks)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, str):
                parts.append(content)
            else:
                parts.extend(block.get("text", "") for block in content if isinstance(block, dict))
        return "".join(parts)
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}")


def format_reward(completions: list, mode: str = "think", **kwargs) -> list[float]:
    """1.0 where the whole completion matches ``FORMAT_PATTERNS[mode]`` (Med-R1), else 0.0."""
    _check_mode(mode)
    pattern = re.compile(FORMAT_PATTERNS[mode], re.DOTALL)
    return [1.0 if pattern.fullmatch(completion_text(c)) else 0.0 for c in completions]


def think_format_reward(completions: list, **kwargs) -> list[float]:
    """Med-R1's think format reward (TRL reward function)."""
    return format_reward(completions, mode="think")


def nothink_format_reward(completions: list, **kwargs) -> list[float]:
    """Med-R1's no-think format reward (TRL reward function)."""
    return format_reward(completions, mode="nothink")


def think_after_format_reward(completions: list, **kwargs) -> list[float]:
    """The think-after format reward (TRL reward function)."""
    return format_reward(completions, mode="think_after")


FORMAT_REWARDS = {"think": think_format_reward, "nothink": nothink_format_reward,
                  "think_after": think_after_format_reward}


def _per_item(values: Any, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")
    return values


def accuracy_reward(completions: list, answer: list, n_options: list | None = None,
                    options: list | None = None, **kwargs) -> list[float]:
    """1.0 where the parsed letter equals the ground-truth letter ``answer[i]``, else 0.0.

    The option count for range checking comes from ``n_options`` or, failing that, from the
    ``options`` column (lists of option texts); both are optional.
    """
    n = len(completions)
    answers = _per_item(answer, n, "answer")
    counts = _per_item(n_options, n, "n_options")
    if n_options is None and options is not None:
        counts = [len(o) for o in _per_item(options, n, "options")]
    rewards = []
    for completion, truth, count in zip(completions, answers, counts):
        pred = parse_answer(completion_text(completion), count)
        rewards.append(1.0 if pred is not None and pred == str(truth).strip().upper() else 0.0)
    return rewards
