"""evaluate(): rows, resumable records, perturb hook, logprob method; accuracy_table(); evaluate.cached (once per
key, resumable); benchmark.benchmark and `python -m safemed_lib eval`."""
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


# ----------------------------------------------------------------------------- evaluate.cached
class Interrupted(Exception):
    pass


class Dying(Counting):
    """A Counting VLM killed (an exception) when asked about its ``die_after + 1``-th batch."""

    def __init__(self, vlm, die_after):
        super().__init__(vlm)
        self.batches, self.die_after = 0, die_after

    def generate(self, images, items, **kw):
        self.batches += 1
        if self.batches > self.die_after:
            raise Interrupted
        return super().generate(images, items, **kw)


def _loader(vlm_like, calls):
    def load():
        calls.append(1)
        return vlm_like
    return load


def _no_model():
    raise AssertionError("load_model called although the evaluation is cached")


EV = dict(prompt="nothink", image_size=SIZE, batch_size=4, max_new_tokens=6)


def test_cached_evaluates_once_per_key(vlm, items, tmp_path):
    calls, counting = [], Counting(vlm)
    df = evaluate.cached(_loader(counting, calls), items, tmp_path / "run", model_key="m1", **EV)
    assert calls == [1] and counting.seen == [it.question_id for it in items]
    pd.testing.assert_frame_equal(df, evaluate.evaluate(vlm, items, **EV), check_dtype=False)
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["result"] == {"n": len(items), "accuracy": pytest.approx(float(df["correct"].mean()))}
    assert done["key"]["model"] == "m1" and done["key"]["n"] == len(items)
    # the second call reads the records: the model is not even loaded
    again = evaluate.cached(_no_model, items, tmp_path / "run", model_key="m1", **EV)
    pd.testing.assert_frame_equal(again, df, check_dtype=False)
    assert len((tmp_path / "run" / evaluate.RECORDS).read_text().splitlines()) == len(items)


def test_cached_resumes_an_interrupted_run_without_recomputing(vlm, items, tmp_path):
    run = tmp_path / "run"
    dying = Dying(vlm, die_after=1)
    with pytest.raises(Interrupted):
        evaluate.cached(lambda: dying, items, run, model_key="m1", **EV)
    assert not (run / "done.json").exists() and (run / "key.json").exists()
    recorded = [json.loads(line)["key"] for line in (run / evaluate.RECORDS).read_text().splitlines()]
    assert recorded == [it.question_id for it in items[:4]]  # the first batch was written before the kill
    counting = Counting(vlm)
    df = evaluate.cached(lambda: counting, items, run, model_key="m1", **EV)
    assert counting.seen == [it.question_id for it in items[4:]]  # recorded items are not recomputed
    keys = [json.loads(line)["key"] for line in (run / evaluate.RECORDS).read_text().splitlines()]
    assert sorted(keys) == sorted(it.question_id for it in items) and len(keys) == len(items)
    assert (run / "done.json").exists() and list(df["question_id"]) == [it.question_id for it in items]
    pd.testing.assert_frame_equal(df, evaluate.evaluate(vlm, items, **EV), check_dtype=False)


@pytest.mark.parametrize("change", [dict(model_key="m2"), dict(extra_key={"eps": 4}), dict(max_new_tokens=4),
                                    dict(prompt="think"), dict(method="logprob"), dict(items=slice(0, 5))])
def test_cached_starts_afresh_for_another_model_or_settings(vlm, items, tmp_path, change):
    run = tmp_path / "run"
    evaluate.cached(lambda: vlm, items, run, model_key="m1", **EV)
    change = dict(change)
    its = items[change.pop("items")] if "items" in change else items
    kw = {"model_key": "m1", **EV, **change}
    calls, counting = [], Counting(vlm)
    df = evaluate.cached(_loader(counting, calls), its, run, **kw)
    assert calls == [1] and counting.seen == [it.question_id for it in its]  # nothing reused
    assert len((run / evaluate.RECORDS).read_text().splitlines()) == len(its)
    assert json.loads((run / "done.json").read_text())["key"]["model"] == kw["model_key"]
    assert len(df) == len(its)
    # ... and that new run is the cached one now
    evaluate.cached(_no_model, its, run, **kw)


def test_cached_keyed_by_model_digest_starts_afresh_for_changed_weights(items, tmp_path):
    """The evaluation of another model never reuses records: ``benchmark.model_digest`` (a key of a
    model's exact weights) changes with the weights, and ``cached`` with another ``model_key`` starts afresh."""
    from safemed_lib import benchmark

    vlm = models.build_tiny_vlm([it.question + " " + " ".join(it.options) for it in items], seed=0,
                                hidden_size=64, image_size=SIZE, vocab_size=600)
    run, its = tmp_path / "run", items[:3]
    d1 = benchmark.model_digest(vlm.model)
    evaluate.cached(lambda: vlm, its, run, model_key=d1, **EV)
    with torch.no_grad():
        next(vlm.model.parameters())[0] += 1e-3
    d2 = benchmark.model_digest(vlm.model)
    assert d2 != d1
    counting = Counting(vlm)
    evaluate.cached(lambda: counting, its, run, model_key=d2, **EV)
    assert counting.seen == [it.question_id for it in its]
    assert json.loads((run / "done.json").read_text())["key"]["model"] == d2


# ----------------------------------------------------------------------------- benchmark.benchmark and `eval`
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny smoke-derived profile in tmp (its benchmark, model cache and eval records), with
    sft-nothink trained once."""
    from safemed_lib import config, zoo

    tmp = tmp_path_factory.mktemp("bench_eval")
    cfg = config.load("smoke", {"model.dir": str(tmp / "models"), "data.bench_dir": str(tmp / "bench"),
                                "data.n_images": 16, "model.tiny.copy_steps": 5, "model.tiny.vision_steps": 5,
                                "model.tiny.pretrain_images": 0, "sft.nothink.steps": 2,
                                "eval.max_new_tokens": 8})
    zoo.ensure("sft-nothink", cfg)
    return cfg, tmp / "runs"


def _fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_benchmark_summary_records_and_resume(bench, tmp_path, monkeypatch):
    from safemed_lib import benchmark, dataset, paths, zoo

    cfg, runs_dir = bench
    monkeypatch.setattr(paths, "RUNS", runs_dir)
    out = tmp_path / "o.json"
    s = benchmark.benchmark("sft-nothink", cfg, n=4, steps=1, out=out)
    assert s["n"] == 4 and s["mode"] == "nothink" and s["model"] == "sft-nothink"
    assert _fraction(s["clean_acc"]) and _fraction(s["attacked_acc"])
    assert s["settings"]["eps"] == 8 and s["settings"]["steps"] == 1 and s["settings"]["norm"] == "linf"
    assert s["settings"]["alpha"] == pytest.approx(2.5 * 8 / 1)  # Madry's step, in 1/255 like eps
    assert s["records"].startswith(str(runs_dir))
    rec = json.loads(out.read_text())
    _, test = dataset.splits(cfg)
    want = [it.question_id for it in evaluate.subset(test, 4, seed=cfg.seed)]
    assert [r["question_id"] for r in rec["items"]] == want  # one record per item, of the test split
    assert {k: rec[k] for k in s} == json.loads(json.dumps(s))
    assert s["clean_acc"] == pytest.approx(np.mean([r["clean_correct"] for r in rec["items"]]))
    assert s["attacked_acc"] == pytest.approx(np.mean([r["attacked_correct"] for r in rec["items"]]))
    for r in rec["items"]:
        assert r["clean_correct"] == (r["clean_pred"] == r["answer"])
        assert r["attacked_correct"] == (r["attacked_pred"] == r["answer"])

    # a second call is read from the records: the model is not loaded
    def no_load(*a, **k):
        raise AssertionError("zoo.load called although the evaluation is recorded")

    monkeypatch.setattr(zoo, "load", no_load)
    out2 = tmp_path / "o2.json"
    assert benchmark.benchmark("sft-nothink", cfg, n=4, steps=1, out=out2) == s
    assert json.loads(out2.read_text()) == rec


def test_benchmark_without_attack_and_bad_settings(bench, tmp_path, monkeypatch):
    from safemed_lib import benchmark, paths, zoo

    cfg, runs_dir = bench
    monkeypatch.setattr(paths, "RUNS", runs_dir)
    s = benchmark.benchmark("sft-nothink", cfg, n=4, attack="none", out=tmp_path / "o.json")
    assert s["attacked_acc"] is None and _fraction(s["clean_acc"]) and s["n"] == 4
    assert s["settings"]["alpha"] is None
    items = json.loads((tmp_path / "o.json").read_text())["items"]
    assert len(items) == 4 and all("attacked_pred" not in r for r in items)
    with pytest.raises(ValueError, match="norm must be one of"):
        benchmark.benchmark("sft-nothink", cfg, n=4, norm="l3")
    with pytest.raises(ValueError, match="attack must be one of"):
        benchmark.benchmark("sft-nothink", cfg, n=4, attack="fgsm")
    # a checkpoint directory does not say which prompt form it answers in
    with pytest.raises(ValueError, match="mode"):
        benchmark.benchmark(str(zoo.ensure("sft-nothink", cfg)), cfg, n=4)


def test_eval_command_line(bench, tmp_path, monkeypatch, capsys):
    from safemed_lib import paths
    from safemed_lib.__main__ import main

    cfg, runs_dir = bench
    monkeypatch.setattr(paths, "RUNS", runs_dir)
    profile = tmp_path / "tiny-test.yaml"
    profile.write_text(cfg.to_yaml())
    out = tmp_path / "sft-nothink.json"
    assert main(["eval", "--profile", str(profile), "--model", "sft-nothink", "--n", "4", "--steps", "1",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft-nothink (nothink) on 4 questions: clean ")
    assert "linf 8/255 PGD-1" in lines[0] and str(out) in lines[0]
    rec = json.loads(out.read_text())
    assert rec["n"] == 4 and len(rec["items"]) == 4 and _fraction(rec["clean_acc"]) and _fraction(rec["attacked_acc"])
    # a bad setting is a clear error, not a traceback
    assert main(["eval", "--profile", str(profile), "--set", "attack.eps=-1", "--model", "sft-nothink",
                 "--out", str(out)]) == 2
    assert "attack.eps" in capsys.readouterr().err


def test_eval_command_line_objective(bench, tmp_path, monkeypatch, capsys):
    """--target reaches the attack (per-item attack_target), the summary's settings and the run key;
    the default leaves earlier runs' record directories as they were; margin on think is refused."""
    from safemed_lib import attacks, paths
    from safemed_lib.__main__ import main

    cfg, runs_dir = bench
    monkeypatch.setattr(paths, "RUNS", runs_dir)
    profile = tmp_path / "tiny-test.yaml"
    profile.write_text(cfg.to_yaml())
    base = ["eval", "--profile", str(profile), "--model", "sft-nothink", "--n", "2", "--steps", "1"]
    seen = []
    real = attacks.pgd_perturb
    monkeypatch.setattr(attacks, "pgd_perturb", lambda *a, **k: seen.append(k["target"]) or real(*a, **k))
    recs = {}
    for target in ("auto", "first_token", "margin"):
        out = tmp_path / f"{target}.json"
        assert main(base + ["--target", target, "--out", str(out)]) == 0
        recs[target] = json.loads(out.read_text())
        assert recs[target]["settings"]["target"] == target
        assert ("(margin)" in capsys.readouterr().out) == (target == "margin")
    assert seen[-1] == "margin" and "first_token" in seen
    records = {t: r["records"] for t, r in recs.items()}
    assert len(set(records.values())) == 3
    from safemed_lib import runs, zoo  # the default's run key is the one from before --target existed
    old = {"mode": "nothink", "method": "generate", "bench_seed": None, "attack": "pgd", "norm": "linf",
           "eps": 8.0, "steps": 1, "restarts": 1, "seed": cfg.seed}
    fp = runs.fingerprint([zoo.key("sft-nothink", cfg), old])
    assert records["auto"] == str(runs_dir / "eval" / cfg.profile / f"sft-nothink-{fp}")
    assert main(["eval", "--profile", str(profile), "--model", "sft-think", "--n", "2", "--target", "margin",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "answer-first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--target", "logits", "--out", str(tmp_path / "y.json")])
