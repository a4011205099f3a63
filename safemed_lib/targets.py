"""What SFT teaches: the canonical completion of each question, with a rationale (think) or the answer alone.

* ``think``:   ``<think> {rationale} </think>\\n<answer> C </answer>``, the rationale being the
  benchmark's chain of thought from ``synth.rationale`` (built from the image's generating
  parameters, ending in the evidence for the answer) and an option check;
* ``nothink``: ``<answer> C </answer>``

(the canonical completions of ``prompts.format_completion``, which ``prompts.format_reward`` accepts
and ``VLM.option_logprobs`` scores). Rationales exist only for the embedded benchmark, whose scenes
(:func:`scenes_for`) say what each image shows.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

from . import data, prompts, synth

VARIANTS = ("think", "nothink")
TARGET_FORMAT = 3  # bump when sft_targets changes: cached SFT models then retrain


def sft_targets(item: data.VQAItem, scene: dict | None, variant: str) -> str:
    """The completion SFT teaches for ``item``, in the canonical form of
    ``prompts.format_completion`` (what ``prompts.format_reward`` accepts and what
    ``VLM.option_logprobs`` scores): ``variant="think"`` gives
    ``"<think> {rationale} </think>\\n<answer> C </answer>"`` with ``synth.rationale(item, scene)``;
    ``"nothink"`` gives ``"<answer> C </answer>"`` (``scene`` unused)."""
    if variant == "nothink":
        return prompts.format_completion(item.answer, "nothink")
    if variant == "think":
        if scene is None:
            raise ValueError(f"{item.question_id}: the think variant needs the image's scene metadata "
                             "(synth.load_scenes) to write a rationale; real OmniMedVQA has none, use "
                             "variant='nothink' there")
        return prompts.format_completion(item.answer, "think", think_rationale(item, scene))
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# The one rationale of a format-only warm-up (``SFTRecipe.format_only``): it says nothing about any image.
FORMAT_RATIONALE = "I look at the image and weigh each option before I answer."


def format_target(item: data.VQAItem, variant: str, rng: random.Random) -> str:
    """A format-only warm-up's completion for ``item``: the canonical form with ``FORMAT_RATIONALE``
    (think) and a letter drawn by ``rng`` among the item's options, whatever its answer: training's target
    at the letter is uniform over the options' letters, and the tokens after it follow a letter that says nothing."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    letter = rng.choice(prompts.LETTERS[:len(item.options)])
    return prompts.format_completion(letter, variant, FORMAT_RATIONALE if variant == "think" else None)


def think_rationale(item: data.VQAItem, scene: dict) -> str:
    """SFT-think's rationale: ``synth.rationale`` (the evidence, then the answer) followed by
    ``prompts.option_check`` (every option judged, in the prompt's order)."""
    return synth.rationale(item, scene) + " " + prompts.option_check(item.options, item.answer)


def shuffle_options(item: data.VQAItem, rng: random.Random) -> data.VQAItem:
    """A copy of ``item`` with its options in a random order and the answer letter moved along.

    SFT draws a fresh order for every item in every step (``train_sft(shuffle=True)``):
    the model cannot tie an answer to a letter or a position, only to the option's text."""
    options = list(item.options)
    right = options[prompts.LETTERS.index(item.answer)]
    order = list(range(len(options)))
    rng.shuffle(order)
    options = [options[i] for i in order]
    return dataclasses.replace(item, options=options, answer=prompts.LETTERS[options.index(right)])


def benchmark_root(item: data.VQAItem) -> Path | None:
    """The embedded benchmark root holding ``item``'s image (the folder with
    ``synth.SCENES_FILE`` above it), or None for data without scene metadata."""
    for parent in Path(item.image_path).resolve().parents:
        if (parent / synth.SCENES_FILE).is_file():
            return parent
    return None


def scenes_for(items: Sequence[data.VQAItem],
               need: str = "think-SFT rationales exist only for the embedded benchmark (use variant='nothink')",
               ) -> list[dict]:
    """Each item's scene (``synth.scene_of``); for items without one a clear error ending in ``need``."""
    cache: dict[Path, dict] = {}
    out = []
    for it in items:
        root = benchmark_root(it)
        if root is None:
            raise ValueError(f"{it.question_id}: no {synth.SCENES_FILE} above {it.image_path}; {need}")
        if root not in cache:
            cache[root] = synth.load_scenes(root)
        out.append(synth.scene_of(it, cache[root], root))
    return out


def sft_target_list(items: Sequence[data.VQAItem], variant: str) -> list[str]:
    """``sft_targets`` for every item (scenes looked up for the think variant)."""
    scenes = scenes_for(items) if variant == "think" else [None] * len(items)
    return [sft_targets(it, sc, variant) for it, sc in zip(items, scenes)]
