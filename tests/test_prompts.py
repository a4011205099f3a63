"""Prompt templates, answer parsing and rewards on realistic model outputs."""
from pathlib import Path

import pytest

from safemed_lib import prompts
from safemed_lib.data import VQAItem, parse_medr1_problem


def make_item(options=("X-ray", "MRI", "Echocardiogram", "Mammography"), answer="D"):
    return VQAItem(question_id="MIAS_0001", dataset="MIAS", image_path=Path("/data/Images/MIAS/mdb084.png"),
                   question="What imaging technique was employed to obtain this picture?", options=list(options),
                   answer=answer, modality="X-Ray", question_type="Modality Recognition")


def test_format_problem_matches_medr1_split_style():
    item = make_item()
    assert prompts.format_problem(item) == ("What imaging technique was employed to obtain this picture? "
                                            "A)X-ray, B)MRI, C)Echocardiogram, D)Mammography")
    # the data module's parser of Med-R1's problem strings reads it back
    assert parse_medr1_problem(prompts.format_problem(item)) == (item.question, item.options)


def test_build_prompt_uses_medr1_templates_verbatim():
    item = make_item()
    think = prompts.build_prompt(item, "think")
    assert think.startswith(prompts.format_problem(item) + " Your task: 1. Think through the question step by step")
    assert think.endswith("3. No extra information or text outside of these tags.")
    nothink = prompts.build_prompt(item, "nothink")
    assert nothink.endswith("2. No extra information or text outside of this tag.")
    assert "<think>" not in nothink
    after = prompts.build_prompt(item, "think_after")
    assert after.index("<answer>") < after.index("<think>")
    with pytest.raises(ValueError, match="unknown prompt mode"):
        prompts.build_prompt(item, "cot")


def test_build_prompt_keeps_braces_in_questions():
    item = make_item()
    item.question = "Which {set} of findings is shown?"
    assert "Which {set} of findings" in prompts.build_prompt(item, "nothink")


@pytest.mark.parametrize("text, letter", [
    ("<think>The image shows a breast.</think>\n<answer>D</answer>", "D"),
    ("<answer> D </answer>", "D"),
    ("<answer>(C)</answer>", "C"),
    ("<answer>C.</answer>", "C"),
    ("<answer>C) Echocardiogram</answer>", "C"),
    ("<answer>b</answer>", "B"),
    ("<answer>\n  A\n</answer>", "A"),
    ("<ANSWER>B</ANSWER>", "B"),
    ("<answer>A Mammography</answer>", "A"),
    ("<answer>**D**</answer>", "D"),
    ("<answer>D: Mammography</answer>", "D"),
    ("<answer> C </answer>\n<think> a round shadow </think>", "C"),
    # repeated answer tags that agree; a block without a letter is ignored
    ("<answer>B</answer> <answer>B</answer>", "B"),
    ("<answer>B</answer><answer>not sure</answer>", "B"),
])
def test_parse_answer_tolerant(text, letter):
    assert prompts.parse_answer(text, 4) == letter


@pytest.mark.parametrize("text", [
    "D",                                          # no tags
    "The answer is D.",                           # no tags
    "<think>long reasoning that was cut off",     # truncated
    "<answer>D",                                  # unclosed tag
    "<answer></answer>",                          # empty
    "<answer>Mammography</answer>",               # option text, not a letter
    "<answer>a lesion</answer>",                  # an English word, not a letter
    "<answer>I think C</answer>",                 # not starting with the letter
    "<answer>A</answer><answer>C</answer>",       # two answers that disagree
    "<answer>E</answer>",                         # outside the 4 options
])
def test_parse_answer_invalid(text):
    assert prompts.parse_answer(text, 4) is None


def test_parse_answer_range_only_with_n_options():
    assert prompts.parse_answer("<answer>E</answer>") == "E"
    assert prompts.parse_answer("<answer>E</answer>", 5) == "E"
    assert prompts.parse_answer("<answer>C</answer>", 2) is None


def test_format_reward_think():
    good = "<think>The scan shows ribs.</think>\n<answer>C</answer>"
    outputs = [good,
               "<think>multi\nline\nreasoning</think><answer>C</answer>",   # DOTALL, no gap
               "Sure! " + good,                                              # text before
               good + " Hope this helps.",                                   # text after
               "<answer>C</answer>",                                         # no think block
               "<answer>C</answer><think>x</think>"]                         # wrong order
    assert prompts.format_reward(outputs, mode="think") == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert prompts.think_format_reward(outputs) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_reward_nothink_and_think_after():
    outputs = ["<answer>C</answer>", "  \n<answer> C </answer>", "<answer>C</answer>\n",
               "<think>x</think><answer>C</answer>", "C"]
    assert prompts.nothink_format_reward(outputs) == [1.0, 1.0, 0.0, 0.0, 0.0]
    after = ["<answer>C</answer>\n<think>because</think>", "<answer>C</answer>",
             "<think>x</think><answer>C</answer>", "<answer>C</answer><think>x</think> ok"]
    assert prompts.think_after_format_reward(after) == [1.0, 0.0, 0.0, 0.0]
    assert set(prompts.FORMAT_REWARDS) == set(prompts.MODES)


def test_rewards_accept_conversational_completions():
    conv = [[{"role": "assistant", "content": "<answer>B</answer>"}],
            [{"role": "assistant", "content": [{"type": "text", "text": "<answer>A</answer>"}]}],
            [{"role": "assistant", "content": "<answer>Z</answer>"}]]
    assert prompts.nothink_format_reward(conv) == [1.0, 1.0, 1.0]
    # TRL passes dataset columns as keyword lists; extra columns are ignored
    rewards = prompts.accuracy_reward(conv, answer=["B", "B", "B"], n_options=[2, 2, 2], image=[None] * 3)
    assert rewards == [1.0, 0.0, 0.0]


def test_accuracy_reward_range_from_options_column():
    texts = ["<answer>C</answer>", "<answer>C</answer>", "no answer"]
    options = [["a", "b"], ["a", "b", "c"], ["a", "b", "c"]]
    assert prompts.accuracy_reward(texts, answer=["C", "C", "C"], options=options) == [0.0, 1.0, 0.0]
    assert prompts.accuracy_reward(texts, answer=["c", "C", "C"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="answer has 1 entries for 3 completions"):
        prompts.accuracy_reward(texts, answer=["C"])


def test_format_completion_round_trips_through_parser_and_rewards():
    for mode in prompts.MODES:
        text = prompts.format_completion("B", mode, rationale="The image shows a knee joint.")
        assert prompts.parse_answer(text, 3) == "B"
        assert prompts.format_reward([text], mode=mode) == [1.0]
        other = [m for m in prompts.MODES if m != mode and m != "nothink"]
        if mode != "nothink":
            assert all(prompts.format_reward([text], mode=m) == [0.0] for m in other)
    assert prompts.format_completion("c", "nothink") == "<answer> C </answer>"
    with pytest.raises(ValueError, match="rationale"):
        prompts.format_completion("C", "think")


def test_option_check_judges_every_option_in_order():
    assert prompts.option_check(["MRI", "CT scan", "X-ray"], "b") == "Options: A) MRI no, B) CT scan yes, C) X-ray no."
    # a wrong option stops at its first word that differs from the right one
    lobes = ["left frontal lobe", "left occipital lobe", "right occipital lobe"]
    assert prompts.option_check(lobes, "B") == \
        "Options: A) left frontal no, B) left occipital lobe yes, C) right no."
    assert prompts.option_check(["left eye", "right eye"], "B") == "Options: A) left no, B) right eye yes."
    # an option that is a prefix of the right one, or the right one a prefix of it, is written in full
    assert prompts.option_check(["no finding", "no", "no finding yet"], "A") == \
        "Options: A) no finding yes, B) no no, C) no finding yet no."
    with pytest.raises(ValueError, match="'D' is not one of the 3"):
        prompts.option_check(["MRI", "CT scan", "X-ray"], "D")
