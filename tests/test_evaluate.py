"""evaluate(): rows, resumable records, perturb hook, logprob method; accuracy_table()."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from safemed_lib import data, evaluate, models, prompts

SIZE = 56


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        p = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(p)
        n = 2 + i % 4
        out.append(data.VQAItem(question_id=f"q{i}", dataset="toy", image_path=p, question="Which finding?",
                                options=[f"option {k}" for k in range(n)], answer="ABCDE"[i % n],
                                modality=data.MODALITIES[i % 8], question_type=data.QUESTION_TYPES[i % 5]))
    return out


@pytest.fixture(scope="module")
def vlm(items):
    return models.build_tiny_vlm([it.question + " " + " ".join(it.options) for it in items], seed=0,
                                 hidden_size=64, image_size=SIZE, vocab_size=600)


class Counting:
    """Wraps a VLM and counts the items it is asked about."""

    def __init__(self, vlm):
        self.vlm, self.model, self.seen = vlm, vlm.model, []

    def generate(self, images, items, **kw):
        self.seen += [it.question_id for it in items]
        return self.vlm.generate(images, items, **kw)

    def option_logprobs(self, images, items, **kw):
        self.seen += [it.question_id for it in items]
        return self.vlm.option_logprobs(images, items, **kw)


def test_rows_match_items_and_parse(vlm, items):
    df = evaluate.evaluate(vlm, items, prompt="nothink", image_size=SIZE, batch_size=4, max_new_tokens=6)
    assert list(df["question_id"]) == [it.question_id for it in items]
    assert list(df["answer"]) == [it.answer for it in items]
    assert list(df["n_options"]) == [len(it.options) for it in items]
    for _, row in df.iterrows():
        assert row["pred"] == prompts.parse_answer(row["output"], row["n_options"])
        assert row["correct"] == (row["pred"] == row["answer"])
    assert df["rounded_8bit"].all() and not df["perturbed"].any()


def test_resume_from_partial_records_without_duplicates(vlm, items, tmp_path):
    path = tmp_path / "rec.jsonl"
    first = evaluate.evaluate(vlm, items[:6], prompt="nothink", image_size=SIZE, batch_size=4,
                              max_new_tokens=6, records_path=path)
    # a run killed mid-write leaves a torn line: it is dropped (with a warning) and recomputed
    with open(path, "a") as f:
        f.write('{"key": "q6", "pred": ')
    counting = Counting(vlm)
    with pytest.warns(UserWarning, match="torn"):
        df = evaluate.evaluate(counting, items, prompt="nothink", image_size=SIZE, batch_size=3,
                               max_new_tokens=6, records_path=path)
    assert counting.seen == [it.question_id for it in items[6:]]  # finished items are not recomputed
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(items)
    assert len(df) == len(items) and list(df["question_id"]) == [it.question_id for it in items]
    pd.testing.assert_frame_equal(df.iloc[:6].reset_index(drop=True), first, check_dtype=False)
    # a third call computes nothing and returns the same table
    counting.seen = []
    again = evaluate.evaluate(counting, items, prompt="nothink", image_size=SIZE, records_path=path)
    assert counting.seen == [] and again.equals(df)


def test_records_of_another_run_are_refused(vlm, items, tmp_path):
    path = tmp_path / "rec.jsonl"
    evaluate.evaluate(vlm, items[:2], prompt="nothink", image_size=SIZE, max_new_tokens=4, records_path=path)
    with pytest.raises(ValueError, match="prompt"):
        evaluate.evaluate(vlm, items, prompt="think", image_size=SIZE, max_new_tokens=4, records_path=path)


def test_perturb_hook_feeds_model_and_adds_columns(vlm, items):
    seen = {}

    def perturb(images, batch):
        seen.setdefault("clean", []).append(images.clone())
        noisy = (images + 0.003 * torch.randn_like(images)).clamp(0, 1)
        return noisy, [{"attack_loss": float(i)} for i in range(len(batch))]

    counting = Counting(vlm)
    df = evaluate.evaluate(counting, items[:5], prompt="nothink", image_size=SIZE, batch_size=5,
                           method="logprob", perturb=perturb)
    assert torch.equal(seen["clean"][0], data.load_images(items[:5], size=SIZE))
    assert list(df["attack_loss"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert df["perturbed"].all() and not df["rounded_8bit"].any()

    def bad(images, batch):
        return images, [{}]  # one extras dict for a batch of 5

    with pytest.raises(ValueError, match="one dict per item"):
        evaluate.evaluate(vlm, items[:5], prompt="nothink", image_size=SIZE, batch_size=5, perturb=bad)


def test_logprob_method_is_argmax_of_option_logprobs(vlm, items):
    df = evaluate.evaluate(vlm, items, prompt="nothink", image_size=SIZE, method="logprob", batch_size=4)
    with torch.no_grad():
        scores = vlm.option_logprobs(data.load_images(items, size=SIZE), items, prompt="nothink")
    assert list(df["pred"]) == ["ABCDE"[int(s.argmax())] for s in scores]
    assert df["pred"].notna().all()


def test_bad_arguments(vlm, items):
    with pytest.raises(ValueError, match="prompt"):
        evaluate.evaluate(vlm, items, prompt="chat", image_size=SIZE)
    with pytest.raises(ValueError, match="method"):
        evaluate.evaluate(vlm, items, prompt="nothink", image_size=SIZE, method="vote")
    with pytest.raises(ValueError, match="duplicate question_id"):
        evaluate.evaluate(vlm, [items[0], items[0]], prompt="nothink", image_size=SIZE)


def test_is_8bit():
    x = torch.randint(0, 256, (2, 3, 4, 4)).float() / 255
    y = x.clone()
    y[1, 0, 0, 0] += 0.5 / 255
    assert evaluate.is_8bit(x) == [True, True] and evaluate.is_8bit(y) == [True, False]


def _frame(rows):
    return pd.DataFrame(rows, columns=["modality", "question_type", "pred", "correct"])


def test_accuracy_table_order_all_row_and_invalid():
    df = _frame([("OCT", "Lesion Grading", "A", True), ("CT", "Disease Diagnosis", None, False),
                 ("OCT", "Modality Recognition", "B", False), ("CT", "Disease Diagnosis", "C", True),
                 ("MRI", "Disease Diagnosis", "A", True)])
    t = evaluate.accuracy_table(df, by="modality")
    assert list(t.index) == ["CT", "MRI", "OCT", "All"]  # canonical order, not input order
    assert t.loc["CT", "accuracy"] == 50.0 and t.loc["CT", "invalid"] == 50.0 and t.loc["CT", "n"] == 2
    assert t.loc["All", "accuracy"] == 60.0 and t.loc["All", "n"] == 5 and t.loc["All", "invalid"] == 20.0
    q = evaluate.accuracy_table(df, by="question_type")
    assert list(q.index) == ["Modality Recognition", "Disease Diagnosis", "Lesion Grading", "All"]
    both = evaluate.accuracy_table(df, by=["modality", "question_type"])
    assert list(both.index) == [("CT", "Disease Diagnosis"), ("MRI", "Disease Diagnosis"),
                                ("OCT", "Modality Recognition"), ("OCT", "Lesion Grading"), ("All", "All")]
    with pytest.raises(ValueError, match="no column"):
        evaluate.accuracy_table(df, by="dataset")


def test_subset_is_seeded_ordered_and_spread(items):
    sub = evaluate.subset(items, 5, seed=3)
    assert len(sub) == 5 and sub == sorted(sub, key=items.index)
    assert sub == evaluate.subset(items, 5, seed=3) and sub != evaluate.subset(items, 5, seed=4)
    assert evaluate.subset(items, 0) == items and evaluate.subset(items, None) == items
    assert evaluate.subset(items, 99) == items


def test_compare_puts_models_side_by_side():
    a = _frame([("CT", "Lesion Grading", "A", True), ("MRI", "Lesion Grading", "B", False)])
    b = _frame([("CT", "Lesion Grading", None, False), ("MRI", "Lesion Grading", "B", True)])
    t = evaluate.compare({"sft": a, "base": b}, by="modality")
    assert list(t.index) == ["CT", "MRI", "All"]
    assert list(t.columns) == ["sft", "base", "base invalid %", "n"]
    assert t.loc["All", "sft"] == 50.0 and t.loc["CT", "base invalid %"] == 100.0 and t.loc["All", "n"] == 2


def _paired(correct, qids=None):
    qids = qids or [f"q{i}" for i in range(len(correct))]
    return pd.DataFrame({"question_id": qids, "correct": correct})


def test_paired_test_counts_discordant_pairs_and_mcnemar():
    a = _paired([True, True, False, False, True, False])
    b = _paired([True, False, True, True, True, False])
    r = evaluate.paired_test(a, b)
    assert (r["n"], r["b_only"], r["a_only"]) == (6, 2, 1)
    assert r["acc_a"] == pytest.approx(50.0) and r["diff"] == pytest.approx(100 / 6)
    assert r["p_value"] == pytest.approx(1.0)  # 1 vs 2 discordant pairs: no evidence
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    # rows are matched by question, not by position
    shuffled = b.iloc[::-1].reset_index(drop=True)
    assert evaluate.paired_test(a, shuffled) == r
    # 10 discordant pairs all in b's favour: exact p = 2 * 0.5**10
    many = evaluate.paired_test(_paired([False] * 10 + [True] * 5), _paired([True] * 15))
    assert many["p_value"] == pytest.approx(2 * 0.5 ** 10) and many["ci_low"] > 0
    same = evaluate.paired_test(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0


def test_paired_test_refuses_unpaired_results():
    a = _paired([True, False])
    with pytest.raises(ValueError, match="different questions.*1 only in a"):
        evaluate.paired_test(a, _paired([True, False], ["q0", "q9"]))
    with pytest.raises(ValueError, match="more than once"):
        evaluate.paired_test(a, _paired([True, False], ["q0", "q0"]))
    with pytest.raises(ValueError, match="no column"):
        evaluate.paired_test(a, pd.DataFrame({"question_id": ["q0", "q1"]}))
    with pytest.raises(ValueError, match="alpha"):
        evaluate.paired_test(a, a, alpha=1.5)


def test_mcnemar_p_is_the_exact_two_sided_binomial_test():
    assert evaluate.mcnemar_p(10, 0) == pytest.approx(2 * 0.5 ** 10) == evaluate.mcnemar_p(0, 10)
    assert evaluate.mcnemar_p(0, 0) == 1.0 and evaluate.mcnemar_p(3, 3) == 1.0
    assert evaluate.mcnemar_p(8, 2) == pytest.approx(0.109375)  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    with pytest.raises(ValueError, match=">= 0"):
        evaluate.mcnemar_p(-1, 2)
