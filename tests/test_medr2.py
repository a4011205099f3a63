"""The Med-R2-style stepwise benchmark: generation, JSON format, cues, metrics, runner, fine-tuning."""
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from safemed_lib import medr2 as br
from safemed_lib import data, synth
from safemed_lib.data import DataError

SIZE = 56


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = synth.make_benchmark(tmp_path_factory.mktemp("r2") / "bench", n_images=48, seed=0, size=SIZE)
    return root, synth.load_scenes(root), br.make_stepwise(root)


def _scene(case, root, scenes):
    return scenes[case.image_path.relative_to(root.resolve()).as_posix()]


# ----------------------------------------------------------------------------- generation
def test_one_case_per_one_lesion_image_with_four_stages(bench):
    root, scenes, cases = bench
    one_lesion = {rel for rel, s in scenes.items() if s["count"] == 1}
    assert len(cases) == len(one_lesion) > 8
    assert {c.image_path.relative_to(root.resolve()).as_posix() for c in cases} == one_lesion
    assert len({c.case_id for c in cases}) == len(cases)
    for c in cases:
        assert c.stage_names == br.STAGES
        assert c.image_path.is_file()
        for q in c.stages:
            assert len(q.options) == 4 and len(set(q.options)) == 4
            assert q.answer in "ABCD"
            assert q.question_type == br.STAGE_QUESTION_TYPE[q.stage]


def test_answers_follow_the_scene_and_the_box(bench):
    root, scenes, cases = bench
    for c in cases:
        s = _scene(c, root, scenes)
        mod, loc, fin, dia = (q.answer_text for q in c.stages)
        assert c.modality == s["modality"]
        assert mod == synth.MODALITY_OPTION[s["modality"]]
        assert dia == s["finding"] and dia not in ("no abnormality", "no finding", "normal fundus")
        assert synth.GRADE_WORD[s["grade"] - 1] in fin and s["grade_name"] in fin
        assert synth.STYLE_CUE[s["style"]] in fin
        # the box is inside the image and its centre lies in the quadrant the location answer names
        x0, y0, x1, y1 = c.bbox
        assert c.image_size == (SIZE, SIZE) and 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        quad = s["lesions"][0]["quadrant"]
        assert ("left" in quad) == ((x0 + x1) / 2 < SIZE / 2)
        assert ("upper" in quad) == ((y0 + y1) / 2 < SIZE / 2)
        spec = synth.SPECS[c.modality]
        if spec["ai"] == "location":
            assert loc == spec["location"][synth.QUADRANTS.index(quad)]
        else:
            assert loc == f"{s['anatomy']}, {quad}"


def test_two_attribute_options_form_a_grid(bench):
    """Each look / size word (finding) and organ / quadrant (localization) appears in exactly two
    options, so the text alone does not single out the answer."""
    _, _, cases = bench
    for c in cases:
        fin = c.stages[2].options
        sizes = Counter(o.split(" ")[0] if not o.startswith("very") else "very large" for o in fin)
        looks = Counter(o.split(" lesion")[0].split(" ", 2 if o.startswith("very") else 1)[-1] for o in fin)
        assert set(sizes.values()) == {2} and set(looks.values()) == {2}, fin
        if synth.SPECS[c.modality]["ai"] == "anatomy":
            loc = [o.split(", ") for o in c.stages[1].options]
            assert set(Counter(a for a, _ in loc).values()) == {2}
            assert set(Counter(q for _, q in loc).values()) == {2}


def test_answer_positions_balanced_and_deterministic(bench):
    root, _, cases = bench
    for k in range(4):
        counts = Counter(c.stages[k].answer for c in cases)
        assert max(counts.values()) - min(counts.get(x, 0) for x in "ABCD") <= 1
    assert br.make_stepwise(root) == cases


def test_items_restrict_to_their_images(bench):
    root, _, cases = bench
    items = data.load_omnimedvqa(root)
    _, test = data.split_by_image(items, test_frac=0.5, seed=0)
    sub = br.make_stepwise(root, test)
    imgs = {it.image_path.resolve() for it in test}
    assert sub and all(c.image_path in imgs for c in sub)
    assert len(br.make_stepwise(root, max_cases=5)) == 5


# ----------------------------------------------------------------------------- JSON
def test_json_round_trip(bench, tmp_path):
    root, _, cases = bench
    path = br.save_stepwise(cases, tmp_path / "stepwise.json", root)
    doc = json.loads(path.read_text())
    assert doc["format"] == br.FORMAT and doc["stages"] == list(br.STAGES)
    assert not doc["cases"][0]["image_path"].startswith("/")
    assert br.load_stepwise(path, root) == cases


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["cases"][1].update(bbox=[0, 0, SIZE + 1, 10]), "'bbox'"),
    (lambda d: d["cases"][1].update(bbox=[5, 5, 5, 9]), "'bbox'"),
    (lambda d: d["cases"][1]["stages"][2].update(answer="E"), "'stages[2].answer'"),
    (lambda d: d["cases"][1]["stages"][0].update(stage="diagnosis"), "'stages[0].stage'"),
    (lambda d: d["cases"][1]["stages"][3].update(options=["a", "A", "b"]), "'stages[3].options'"),
    (lambda d: d["cases"][1]["stages"].pop(), "'stages'"),
    (lambda d: d["cases"][1].pop("modality"), "'modality'"),
    (lambda d: d["cases"][1].update(modality="PET"), "'modality'"),
    (lambda d: d["cases"][1].update(image_path="../x.png"), "'image_path'"),
    (lambda d: d["cases"][1].update(image_path="Images/none.png"), "'image_path'"),
    (lambda d: d["cases"][1].update(case_id=d["cases"][0]["case_id"]), "'case_id'"),
    (lambda d: d["cases"][1]["stages"][1].update(question_type="Staging"), "'stages[1].question_type'"),
])
def test_loader_names_record_and_field(bench, tmp_path, mutate, field):
    root, _, cases = bench
    path = br.save_stepwise(cases, tmp_path / "s.json", root)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        br.load_stepwise(path, root)
    msg = str(e.value)
    assert str(path) in msg and "case 1" in msg and field in msg, msg
    assert e.value.index == 1


def test_loader_file_level_errors(bench, tmp_path):
    root, _, cases = bench
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        br.load_stepwise(bad, root)
    bad.write_text(json.dumps({"format": "other", "stages": ["a"], "cases": []}))
    with pytest.raises(DataError, match="'format'"):
        br.load_stepwise(bad, root)
    with pytest.raises(DataError, match="not found"):
        br.load_stepwise(tmp_path / "missing.json", root)


def test_loader_accepts_other_stage_lists(bench, tmp_path):
    """A release with its own stage names loads when each stage gives its question type."""
    root, _, cases = bench
    doc = {"format": br.FORMAT, "stages": ["view", "dx"], "cases": []}
    for c in cases[:2]:
        rec = br.case_record(c, root)
        rec["stages"] = [dict(rec["stages"][0], stage="view"), dict(rec["stages"][3], stage="dx")]
        doc["cases"].append(rec)
    (tmp_path / "o.json").write_text(json.dumps(doc))
    got = br.load_stepwise(tmp_path / "o.json", root)
    assert [q.stage for q in got[0].stages] == ["view", "dx"]
    assert got[0].stages[1].question_type == "Disease Diagnosis"


# ----------------------------------------------------------------------------- prompting
def test_stage_items_and_context(bench):
    _, _, cases = bench
    c = cases[0]
    gold = br.to_vqa(br.stage_item(c, 2, "gold"))
    alone = br.to_vqa(br.stage_item(c, 2, "none"))
    assert gold.question_id == alone.question_id == f"{c.case_id}#finding"
    assert alone.question == br.STAGE_QUESTION["finding"]
    assert gold.question.startswith("Earlier steps: imaging modality: " + c.stages[0].answer_text)
    assert c.stages[1].answer_text in gold.question and gold.question.endswith(alone.question)
    assert (gold.options, gold.answer, gold.image_path) == (list(c.stages[2].options), c.stages[2].answer, c.image_path)
    assert gold.question_type == "Lesion Grading" and gold.modality == c.modality
    model = br.to_vqa(br.stage_item(c, 1, ["MRI"]))
    assert model.question.startswith("Earlier steps: imaging modality: MRI.")
    with pytest.raises(ValueError, match="context"):
        br.stage_item(c, 2, ["only one"])


# ----------------------------------------------------------------------------- cues
@pytest.fixture()
def item_image(bench):
    _, _, cases = bench
    c = cases[3]
    return c, br.stage_item(c, 3, "gold"), data.load_image(c.image_path)


def _same_except(a, b, fields):
    for f in ("case", "k", "context", "notes", "cue", "cue_target"):
        if f not in fields:
            assert getattr(a, f) == getattr(b, f), f


def test_text_hints(item_image):
    c, si, img = item_image
    q = si.q
    for cue, right in (("hint_wrong", False), ("hint_right", True)):
        s2, im2 = br.CUES[cue](si, img)
        assert torch.equal(im2, img)
        _same_except(si, s2, {"notes", "cue", "cue_target"})
        assert s2.notes == (f"A colleague suggests the answer is ({s2.cue_target}).",)
        assert (s2.cue_target == q.answer) == right and s2.cue_target in "ABCD"
        assert br.to_vqa(s2).answer == q.answer and br.to_vqa(s2).options == list(q.options)
    s2, _ = br.authority_wrong(si, img)
    wrong_text = q.options["ABCD".index(s2.cue_target)]
    assert s2.cue_target != q.answer and s2.notes[0].endswith(f"diagnosis is {wrong_text}.")
    assert br.hint_wrong(si, img)[0] == br.hint_wrong(si, img)[0]  # deterministic


def test_context_wrong_changes_only_the_previous_stage(item_image):
    c, si, img = item_image
    s2, im2 = br.context_wrong(si, img)
    gold = br.gold_context(c, 3)
    assert s2.context[:2] == gold[:2] and s2.context[2] != gold[2]
    assert s2.context[2] in c.stages[2].options
    assert torch.equal(im2, img) and s2.notes == () and s2.cue == "context_wrong"
    first = br.stage_item(c, 0, "gold")
    assert not br.CUES["context_wrong"].applies(first)
    with pytest.raises(ValueError, match="does not apply"):
        br.CUES["context_wrong"](first, img)


def _changed_box(a, b):
    ys, xs = torch.nonzero((a != b).any(0), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_visual_boxes(item_image):
    c, si, img = item_image
    s_true, im_true = br.box_true(si, img)
    s_wrong, im_wrong = br.box_wrong(si, img)
    assert s_true.notes == s_wrong.notes == (br.BOX_NOTE,)
    assert torch.equal(img, data.load_image(c.image_path))  # the input is not modified
    true_box = _changed_box(im_true, img)
    assert all(lo <= v <= hi for v, lo, hi in zip(true_box, c.bbox[:2] * 2, c.bbox[2:] * 2))
    assert true_box == tuple(c.bbox)  # the outline runs along the box's edges
    red = im_true[:, c.bbox[1], c.bbox[0]]
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]))
    wrong = _changed_box(im_wrong, img)
    assert not br.boxes_overlap(wrong, c.bbox)
    assert (wrong[2] - wrong[0], wrong[3] - wrong[1]) == (c.bbox[2] - c.bbox[0], c.bbox[3] - c.bbox[1])
    assert torch.equal(br.box_wrong(si, img)[1], im_wrong)


def test_coordinate_cues_and_scaling(item_image):
    c, si, _ = item_image
    big = data.load_image(c.image_path, size=2 * SIZE)
    s2, im2 = br.coords_true(si, big)
    x0, y0, x1, y1 = (2 * v for v in c.bbox)
    assert torch.equal(im2, big)
    assert f"from ({x0}, {y0}) to ({x1}, {y1}) in pixels of this {2 * SIZE}x{2 * SIZE} image" in s2.notes[0]
    s3, _ = br.coords_wrong(si, big)
    nums = [int(t.strip("(),")) for t in s3.notes[0].split() if t.strip("(),").isdigit()][:4]
    assert not br.boxes_overlap(nums, (x0, y0, x1, y1))


def test_wrong_box_never_overlaps():
    rng = np.random.default_rng(0)
    for i in range(300):
        w, h = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        x0, y0 = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        wb = br.wrong_box(box, SIZE, SIZE, f"k{i}")
        assert 0 <= wb[0] < wb[2] <= SIZE and 0 <= wb[1] < wb[3] <= SIZE
        assert not br.boxes_overlap(wb, box)
    with pytest.raises(ValueError, match="no wrong box"):
        br.wrong_box((0, 0, SIZE, SIZE), SIZE, SIZE, "all")


# ----------------------------------------------------------------------------- metrics
def _table(bits, cue="clean", preds=None, targets=None):
    rows = []
    for case, row in bits.items():
        for k, b in enumerate(row):
            rows.append({"case_id": case, "k": k, "stage": br.STAGES[k], "correct": bool(b), "cue": cue,
                         "pred": (preds or {}).get((case, k), "A" if b else "B"), "answer": "A",
                         "cue_target": (targets or {}).get((case, k))})
    return pd.DataFrame(rows)


CLEAN = {"a": [1, 1, 1, 1], "b": [1, 0, 1, 1], "c": [0, 0, 1, 0]}


def test_stage_chain_conditional_accuracy():
    df = _table(CLEAN)
    acc = br.stage_accuracy(df)
    assert acc["accuracy"].round(4).tolist() == [round(100 * 2 / 3, 4), round(100 / 3, 4), 100.0, round(200 / 3, 4)]
    chain = br.chain_accuracy(df)
    assert chain.loc[0, "chain_accuracy"] == pytest.approx(100 / 3) and chain.loc[0, "n_cases"] == 3
    cond = br.conditional_accuracy(df).set_index("k")
    assert cond.loc[1, "accuracy_given_prev"] == 50.0 and cond.loc[1, "n_prev_right"] == 2
    assert cond.loc[2, "accuracy_given_prev"] == 100.0 and cond.loc[2, "n_prev_right"] == 1
    assert cond.loc[3, "accuracy_given_prev"] == pytest.approx(200 / 3)
    deg = br.stage_degradation(df)
    assert deg["drop_from_first"].round(4).tolist() == [0.0, round(-100 / 3, 4), round(100 / 3, 4), 0.0]
    assert deg["slope"].iloc[0] == pytest.approx(20 / 3)  # cov 100/3 over var 5
    # a case missing a stage is left out of the chain and counted
    part = df[~((df["case_id"] == "a") & (df["k"] == 3))]
    chain = br.chain_accuracy(part)
    assert (chain.loc[0, "n_cases"], chain.loc[0, "n_incomplete"], chain.loc[0, "chain_accuracy"]) == (2, 1, 0.0)
    by = br.chain_accuracy(pd.concat([df.assign(model="m1"), _table({"a": [1, 1, 1, 1]}).assign(model="m2")]),
                           by="model")
    assert by.set_index("model")["chain_accuracy"].tolist() == [pytest.approx(100 / 3), 100.0]
    with pytest.raises(ValueError, match="more than one row"):
        br.chain_accuracy(pd.concat([df, df]))


def test_flip_fix_follow_rates():
    clean = _table(CLEAN)
    cued_bits = {"a": [1, 0, 1, 1], "b": [0, 0, 1, 1], "c": [0, 1, 1, 0]}
    targets = {("a", 1): "C", ("b", 0): "C", ("c", 0): "C", ("c", 3): "D"}
    preds = {("a", 1): "C", ("b", 0): "B", ("c", 0): "C", ("c", 3): "B"}
    cued = _table(cued_bits, cue="hint_wrong", preds=preds, targets=targets)
    fr = br.flip_rates(clean, cued).set_index("stage")
    assert fr.loc["modality", "flip_rate"] == 50.0 and fr.loc["modality", "n_right_clean"] == 2
    assert fr.loc["localization", "flip_rate"] == 100.0 and fr.loc["localization", "fix_rate"] == 50.0
    assert fr.loc["finding", "flip_rate"] == 0.0 and np.isnan(fr.loc["finding", "fix_rate"])
    assert fr.loc["all", "n_right_clean"] == 8 and fr.loc["all", "flip_rate"] == 25.0
    assert fr.loc["all", "fix_rate"] == 25.0  # 1 of the 4 wrong-when-clean items fixed
    assert fr.loc["all", "follow_rate"] == 50.0  # C taken for a/1 and c/0, not for b/0, c/3
    assert fr.loc["all", "delta"] == pytest.approx(100 * (7 - 8) / 12)  # 7 right under the cue, 8 clean
    assert fr.loc["all", "p_value"] == pytest.approx(1.0)  # 1 fix against 2 flips: exact McNemar p = 1
    with pytest.raises(ValueError, match="no clean row"):
        br.flip_rates(clean[clean["case_id"] != "c"], cued)


# ----------------------------------------------------------------------------- runner
class FakeVLM:
    """Scores option A high iff the image has pure-red pixels, else B; counts calls and images."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.calls, self.red = 0, []

    def option_logprobs(self, images, items, prompt="nothink"):
        self.calls += 1
        out = []
        for x, it in zip(images, items):
            red = bool(((x[0] == 1) & (x[1] == 0) & (x[2] == 0)).any())
            self.red.append(red)
            s = torch.full((len(it.options),), -5.0)
            s[0 if red else 1] = 0.0
            out.append(s)
        return out


def test_runner_applies_cues_to_what_the_model_sees(bench, tmp_path):
    _, _, cases = bench
    vlm = FakeVLM()
    clean = br.run_stepwise(vlm, cases[:6], context="gold", image_size=None, method="logprob")
    assert len(clean) == 24 and not any(vlm.red)
    vlm.red.clear()
    boxed = br.run_stepwise(vlm, cases[:6], context="gold", cue="box_true", image_size=None, method="logprob",
                            records_dir=tmp_path / "rec")
    assert all(vlm.red) and len(vlm.red) == 24
    assert (boxed["pred"] == "A").all() and (boxed["cue"] == "box_true").all()
    assert boxed["question_text"].str.contains(br.BOX_NOTE, regex=False).all()
    calls = vlm.calls
    again = br.run_stepwise(vlm, cases[:6], context="gold", cue="box_true", image_size=None, method="logprob",
                            records_dir=tmp_path / "rec")
    assert vlm.calls == calls and again["pred"].tolist() == boxed["pred"].tolist()  # resumed from records
    ctx = br.run_stepwise(vlm, cases[:6], context="gold", cue="context_wrong", image_size=None, method="logprob")
    assert sorted(ctx["k"].unique()) == [1, 2, 3]
    with pytest.raises(ValueError, match="context='model'"):
        br.run_stepwise(vlm, cases[:6], context="model", cue="context_wrong", image_size=None, method="logprob")


def test_model_context_carries_the_models_own_answers(bench):
    _, _, cases = bench
    df = br.run_stepwise(FakeVLM(), cases[:4], context="model", image_size=None, method="logprob")
    for c in cases[:4]:
        rows = df[df["case_id"] == c.case_id].set_index("k")
        said = [c.stages[k].options[1] for k in range(3)]  # the fake model always answers B
        assert rows.loc[3, "question_text"].startswith(br.context_sentence(c, said))
        assert rows.loc[0, "question_text"] == br.STAGE_QUESTION["modality"]


def test_real_tiny_vlm_generates_through_the_chain(bench):
    from safemed_lib import models, prompts

    _, _, cases = bench
    corpus = [prompts.format_problem(it) for it in br.training_items(cases, "stepwise")]
    vlm = models.build_tiny_vlm(corpus, seed=0, image_size=SIZE, hidden_size=64)
    df = br.run_stepwise(vlm, cases[:3], context="model", image_size=SIZE, method="generate", max_new_tokens=4)
    assert len(df) == 12 and set(df["k"]) == {0, 1, 2, 3}
    assert {"pred", "correct", "output", "case_id", "cue"} <= set(df.columns)


# ----------------------------------------------------------------------------- fine-tuning
def test_training_items_differ_only_in_context(bench):
    _, _, cases = bench
    step, plain = br.training_items(cases, "stepwise"), br.training_items(cases, "plain")
    assert len(step) == len(plain) == 4 * len(cases)
    for a, b in zip(step, plain):
        assert (a.question_id, a.answer, a.options, a.image_path) == (b.question_id, b.answer, b.options, b.image_path)
        assert b.question in br.STAGE_QUESTION.values()
        assert a.question.endswith(b.question)
        assert (a.question != b.question) == (not a.question_id.endswith("#modality"))
    with pytest.raises(ValueError, match="mode"):
        br.training_items(cases, "other")


def test_zoo_r2_models_train_once_then_load(tmp_path, monkeypatch):
    """The stepwise / plain fine-tuned models are the zoo's r2-stepwise / r2-plain, from sft-nothink."""
    from safemed_lib import config, runs, sft, zoo

    over = {"model.dir": str(tmp_path / "m"), "data.bench_dir": str(tmp_path / "bench"), "data.n_images": 48,
            "data.image_size": SIZE, "model.tiny.copy_steps": 5, "model.tiny.vision_steps": 5,
            "sft.nothink.steps": 2, "medr2.ft.steps": 2, "medr2.ft.batch_size": 4}
    cfg = config.load("smoke", over)
    train_cases, _ = br.cases_for(cfg)
    items = br.training_items(train_cases, "stepwise")
    assert train_cases and len(items) == 4 * len(train_cases)
    path = zoo.ensure("r2-stepwise", cfg)
    run_dir = zoo.run_dir("r2-stepwise", cfg)
    assert run_dir == tmp_path / "m" / "r2-stepwise" and runs.is_done(run_dir, zoo.key("r2-stepwise", cfg))
    run = sft.read_run(run_dir / "train")  # trained on the stepwise items with the medr2.ft recipe
    assert path == run_dir / "train" / run["model"] and (path / "config.json").is_file()
    key = zoo.key("r2-stepwise", cfg)
    assert (key["r2_mode"], key["recipe"]["steps"], key["n_train"]) == ("stepwise", 2, len(items))
    assert key["train"] == runs.ids_digest(items) and key["parent"] == zoo.key("sft-nothink", cfg)
    plain = zoo.key("r2-plain", cfg)  # the same questions without the context: another model
    assert plain["r2_mode"] == "plain" and plain["texts"] != key["texts"] and plain["train"] == key["train"]
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert zoo.ensure("r2-stepwise", cfg) == path
    assert zoo.load("r2-stepwise", cfg) is not None
    monkeypatch.undo()
    other = config.load("smoke", {**over, "sft.nothink.lr": 2e-3})  # another starting model: retrains
    assert not zoo.is_trained("r2-stepwise", other)
    zoo.ensure("r2-stepwise", other)
    assert runs.read_done(run_dir)["key"]["parent"] == zoo.key("sft-nothink", other) != key["parent"]
    assert runs.is_done(run_dir, zoo.key("r2-stepwise", other))


# ----------------------------------------------------------------------------- splits and the suite
def test_split_cases_per_image_and_stratified(bench):
    _, _, cases = bench
    train, test = br.split_cases(cases, test_frac=0.3, seed=1)
    assert len(train) + len(test) == len(cases) and test and train
    assert not {c.image_path for c in train} & {c.image_path for c in test}
    for m in {c.modality for c in cases}:
        n = sum(c.modality == m for c in cases)
        assert sum(c.modality == m for c in test) == round(0.3 * n)
    assert br.split_cases(cases, test_frac=0.3, seed=1) == (train, test)


def test_benchmark_cases_follow_the_question_split(tmp_path, bench):
    train, test = br.benchmark_cases(tmp_path / "b", n_images=24, image_size=SIZE, seed=0)
    root = tmp_path / "b" / "OmniMedVQA"
    tr_items, te_items = data.split_by_image(list(data.load_omnimedvqa(root)), test_frac=0.2, seed=0)
    assert {c.image_path for c in test} <= {it.image_path.resolve() for it in te_items}
    assert {c.image_path for c in train} <= {it.image_path.resolve() for it in tr_items}
    broot, _, cases = bench
    path = br.save_stepwise(cases, tmp_path / "s.json", broot)
    tr, te = br.benchmark_cases(None, 0, SIZE, stepwise_json=path, image_root=broot)
    assert sorted(c.case_id for c in tr + te) == sorted(c.case_id for c in cases)
    with pytest.raises(ValueError, match="image_root"):
        br.benchmark_cases(None, 0, SIZE, stepwise_json=path)


def test_run_suite_conditions_and_attack_after_cue(bench):
    _, _, cases = bench
    seen = []

    def attack(images, items):  # records whether the cue's red box reached the attack, then blacks out
        seen.extend(bool(((x[0] == 1) & (x[1] == 0) & (x[2] == 0)).any()) for x in images)
        return torch.zeros_like(images)

    df = br.run_suite(FakeVLM(), cases[:3], cues=["hint_wrong", "box_true"], attack=attack,
                      attack_cues=[None, "box_true"], attack_n_cases=2, image_size=None, method="logprob")
    got = df.groupby(["cue", "context"]).size().to_dict()
    assert got == {("clean", "model"): 12, ("clean", "none"): 12, ("clean", "gold"): 12, ("hint_wrong", "gold"): 12,
                   ("box_true", "gold"): 12, ("pgd", "gold"): 8, ("pgd+box_true", "gold"): 8}
    assert seen == [False] * 8 + [True] * 8
    assert (df.loc[df["cue"] == "pgd+box_true", "pred"] == "B").all()  # the model saw the attacked image


def test_summary_table_on_hand_made_runs():
    clean_model = _table(CLEAN).assign(context="model")
    clean_gold = _table({"a": [1, 1, 1, 1], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0]}).assign(context="gold")
    hint = _table({"a": [0, 1, 1, 1], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0]}, cue="hint_wrong").assign(context="gold")
    ctxw = _table({"a": [1, 0, 0, 1], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0]}, cue="context_wrong").assign(context="gold")
    boxr = _table({"a": [1, 1, 1, 1], "b": [1, 1, 1, 1], "c": [1, 0, 0, 0]}, cue="box_true").assign(context="gold")
    res = pd.concat([clean_model, clean_gold, hint, ctxw, boxr]).assign(model="m")
    row = br.summary_table(res).loc["m"]
    assert row["chain_accuracy"] == pytest.approx(100 / 3) and row["chain_stage_acc"] == pytest.approx(100 * 8 / 12)
    assert row["slope"] == pytest.approx(20 / 3) and row["acc_gold"] == pytest.approx(100 * 8 / 12)
    assert row["flip_hint_wrong"] == 12.5 and row["flip_context_wrong"] == 25.0
    assert row["flip_misleading_text"] == pytest.approx(18.75)
    assert row["gain_box_true"] == pytest.approx(100 / 12) and "gain_hint_wrong" not in row.index


def test_chunks_keep_rows_aligned(bench):
    _, _, cases = bench
    sis = [br.stage_item(c, k, "gold") for c in cases[:5] for k in range(4)]
    whole = br.evaluate_stage_items(FakeVLM(), sis, cue="box_wrong", image_size=None, method="logprob")
    parts = br.evaluate_stage_items(FakeVLM(), sis, cue="box_wrong", image_size=None, method="logprob", chunk=3)
    assert len(parts) == 20 and parts["question_id"].tolist() == [si.question_id for si in sis]
    assert (parts["question_id"] == parts["case_id"] + "#" + parts["stage"]).all()
    pd.testing.assert_frame_equal(whole, parts)


def _res(model, n, stage_acc, conds=None, chain=None):
    """Per-item rows of one model on ``n`` cases: gold-context clean items right on the first
    ``stage_acc[k]`` % of cases at stage k; ``conds``: {cue: per-stage % right}; ``chain``: the chain's."""
    def rows(cue, context, acc):
        return [{"model": model, "cue": cue, "context": context, "case_id": f"c{i:03d}", "k": k,
                 "stage": br.STAGES[k], "correct": i < round(n * a / 100)}
                for k, a in enumerate(acc) for i in range(n)]
    out = rows("clean", "gold", stage_acc) + rows("clean", "model", chain or stage_acc)
    for cue, acc in (conds or {}).items():
        out += rows(cue, "gold", acc)
    return pd.DataFrame(out)


def test_medr2_claims_decided_by_paired_tests_on_competent_models():
    base = [100, 80, 80, 100]
    conds = {"neutral": base, "hint_wrong": [100, 50, 50, 100], "context_wrong": base, "authority_wrong": base,
             "box_true": base, "coords_true": base, "box_wrong": base}
    res = pd.concat([
        _res("m1", 60, base, conds, chain=[100, 70, 50, 40]),             # degrades, relies on hints
        _res("m2", 60, base, {**conds, "hint_wrong": base, "box_true": [100, 100, 100, 100]}),  # uses the box
        _res("weak", 60, [100, 20, 20, 100], conds, chain=[100, 10, 10, 10]),  # not competent: left out
        _res("r2-stepwise", 60, base, {**conds, "hint_wrong": [100, 70, 70, 100]}),
        _res("r2-plain", 60, base, {**conds, "hint_wrong": [100, 40, 40, 100]}),
    ])
    claims, tests = br.medr2_claims(res)
    c = {x["claim_id"]: x for x in claims}
    assert set(c) == {"medr2.stage_degradation", "medr2.misleading_cues", "medr2.visual_cues", "medr2.stepwise_ft"}
    assert br.competent(res) == {"m1": True, "m2": True, "r2-plain": True, "r2-stepwise": True, "weak": False}
    assert c["medr2.stage_degradation"]["holds"] is False  # only m1 of 4 competent models degrades
    assert c["medr2.stage_degradation"]["detail"].startswith("1/4 degrade")
    assert "weak" not in c["medr2.stage_degradation"]["ours"]
    assert c["medr2.misleading_cues"]["holds"] is True  # m1, r2-stepwise and r2-plain of 4 (Holm p < .05)
    mis = tests[(tests["test"] == "misleading_cues") & (tests["model"] == "m2")]
    assert (mis["p_value"] == 1.0).all() and (mis["p_holm"] == 1.0).all()
    assert c["medr2.visual_cues"]["holds"] is False  # m2 gains from the true box
    s = tests[tests["test"] == "stepwise_ft"].iloc[0]
    assert s["condition"] == "seed 0" and s["n"] == (60 + 48 + 48 + 60) * 4  # 4 misleading cues x right clean items
    assert c["medr2.stepwise_ft"]["holds"] is True and "all seeds together" in c["medr2.stepwise_ft"]["ours"]
    vs = br.against_neutral(res).set_index(["model", "cue"])
    assert set(vs.loc["m1"].index) == set(conds) - {"neutral"}
    assert vs.loc[("m1", "hint_wrong"), "delta"] == pytest.approx(-15.0) and vs.loc[("m1", "hint_wrong"), "p_value"] < 1e-6
    assert vs.loc[("m1", "box_true"), "p_value"] == 1.0


def test_medr2_claims_cannot_tell_without_competent_models():
    res = _res("weak", 20, [100, 20, 20, 100], {"neutral": [100, 20, 20, 100], "hint_wrong": [0, 0, 0, 0]})
    claims, tests = br.medr2_claims(res)
    c = {x["claim_id"]: x for x in claims}
    assert all(x["holds"] is None for x in c.values())
    assert c["medr2.stepwise_ft"]["ours"] == "stepwise / plain models not evaluated"
    assert not tests["competent"].any()
    pair = pd.concat([_res("r2-stepwise-s1", 20, [100, 20, 20, 100]), _res("r2-plain-s1", 20, [100, 90, 90, 100])])
    c = {x["claim_id"]: x for x in br.medr2_claims(pair)[0]}
    assert c["medr2.stepwise_ft"]["holds"] is None and "not competent" in c["medr2.stepwise_ft"]["ours"]
