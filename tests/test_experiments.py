"""The notebooks' experiment helpers: Med-R1's protocols (experiments/medr1.py), SafeMed-R1's table (experiments/safemed.py).

The table functions are checked on hand-made numbers; the protocol and the robustness evaluation
run on the smoke profile with a 16-image benchmark, a small base and 1-2 step recipes, with every
model under a temporary folder, and are checked to read their cached results back without
building a model.
"""
from __future__ import annotations

import pickle

import pandas as pd
import pytest

from safemed_lib import config, grpo, sft, zoo
from safemed_lib.experiments import medr1, safemed


# --------------------------------------------------------------------------- Med-R1: the tables
def test_generalization_tests_pair_each_cell_with_the_base_and_sft():
    qids = [f"q{i}" for i in range(10)]

    def rows(method, group, correct):
        return pd.DataFrame({"method": method, "train_group": group, "question_id": qids, "correct": correct})
    res = pd.concat([rows("base", "(base)", [1] * 5 + [0] * 5),
                     rows("SFT", "CT", [1] * 5 + [0] * 5), rows("GRPO", "CT", [1] * 10),
                     rows("SFT", "MRI", [0] * 10), rows("GRPO", "MRI", [1] * 5 + [0] * 5)])
    t = medr1.generalization_tests(res).set_index(["train_group", "comparison"])
    assert list(t.index.get_level_values(0).unique()) == ["CT", "MRI"] and len(t) == 6
    assert t.loc[("CT", "SFT - base"), "diff (points)"] == 0 and t.loc[("CT", "SFT - base"), "p_value"] == 1.0
    assert t.loc[("CT", "GRPO - base"), "diff (points)"] == pytest.approx(50.0)
    assert t.loc[("CT", "GRPO - base"), "p_value"] == pytest.approx(2 * 0.5 ** 5)   # 5 fixes, 0 flips
    assert t.loc[("MRI", "SFT - base"), "diff (points)"] == pytest.approx(-50.0)
    assert t.loc[("MRI", "GRPO - SFT"), "diff (points)"] == pytest.approx(50.0) and (t["n"] == 10).all()


def _matrices(base: float, sft_: float, grpo_: float, groups=("CT", "MRI")) -> dict:
    def m(v, index):
        df = pd.DataFrame(v, index=pd.Index(index, name="train_group"), columns=list(groups))
        return df.assign(All=df.mean(axis=1))
    return {"base": m(base, ["(base)"]), "SFT": m(sft_, list(groups)), "GRPO": m(grpo_, list(groups))}


def test_generalization_claims_material_gain_and_chance():
    claims = medr1.generalization_claims({"modality": _matrices(40.0, 45.0, 52.0)}, chance=29.0, detail="640 Qs")
    (c,) = claims
    assert c["claim_id"] == "medr1.cross_modality_gain" and c["holds"] is True
    assert c["ours"] == "GRPO - base +12.00 points (SFT - base +5.00; GRPO mean accuracy 52.0%)"
    assert c["detail"].startswith("640 Qs; holds = GRPO at least 10 points above the base")
    small = medr1.generalization_claims({"question_type": _matrices(40.0, 45.0, 45.0)}, chance=29.0)
    assert [c["claim_id"] for c in small] == ["medr1.cross_qtype_gain"] and small[0]["holds"] is False
    assert medr1.generalization_claims({"modality": _matrices(20.0, 30.0, 30.0)}, chance=29.0,
                                       min_gain=5)[0]["holds"] is None  # GRPO at 30% with chance 29%: cannot tell
    assert medr1.generalization_claims({"modality": _matrices(40.0, 45.0, 45.0)}, chance=29.0,
                                       min_gain=5)[0]["holds"] is True


def test_generalization_gains_by_hand():
    cols = ["CT", "MRI"]
    m = lambda rows: pd.DataFrame(rows, index=cols, columns=cols).assign(All=0.0)  # noqa: E731
    mats = {"base": pd.DataFrame([[20.0, 40.0, 0.0]], index=["(base)"], columns=cols + ["All"]),
            "SFT": m([[30.0, 40.0], [20.0, 50.0]]), "GRPO": m([[50.0, 60.0], [40.0, 70.0]])}
    g = medr1.generalization_gains(mats)
    assert g.loc["GRPO - base", "mean gain (points)"] == pytest.approx((30 + 20 + 20 + 30) / 4)
    assert g.loc["GRPO - base", "diagonal (in-group) gain"] == pytest.approx((30 + 30) / 2)
    assert g.loc["GRPO - base", "off-diagonal gain"] == pytest.approx((20 + 20) / 2)
    assert g.loc["GRPO - SFT", "mean gain (points)"] == pytest.approx(20.0)


# --------------------------------------------------------------------------- SafeMed-R1: the tables
def test_robustness_summary_targets():
    t = pd.DataFrame({"clean": [30.0, 25.0], "PGD": [5.0, 12.0]}, index=["SFT", "AT"])
    row = safemed.robustness_summary(t, baseline="SFT", robust="AT").iloc[0]
    assert row["PGD ratio"] == pytest.approx(2.4) and row["PGD ratio >= 2"] and row["clean drop <= 10"]
    t.loc["AT", "clean"] = 10.0
    assert not safemed.robustness_summary(t, baseline="SFT", robust="AT").iloc[0]["clean drop <= 10"]


def test_suite_grid_per_prompt_form():
    cfg = config.load("tiny")
    think, nothink = safemed.suite_grid(cfg, "think"), safemed.suite_grid(cfg, "nothink")
    names = ["linf_8", "first_token", "linf_8_x5", "linf_1", "linf_2", "linf_4", "linf_16", "linf_64",
             "l2_0.25", "l2_0.5", "l2_1"]
    assert [g["name"] for g in think] == names
    assert [g["name"] for g in nothink] == names[:2] + ["margin"] + names[2:]  # the letter margin: answer-first only
    g = {x["name"]: x for x in nothink}
    assert g["linf_8"]["eps"] == pytest.approx(8 / 255) and g["linf_8"]["alpha"] == pytest.approx(2 / 255)
    # the fork's objective at the table's radius, with the fork's step and steps and no random start
    assert g["first_token"] == {"name": "first_token", "norm": "linf", "eps": pytest.approx(8 / 255),
                                "alpha": 0.01, "steps": 10, "target": "first_token", "random_start": False}
    assert g["margin"]["target"] == "margin" and g["margin"]["eps"] == g["linf_8"]["eps"]
    assert (g["linf_8_x5"]["steps"], g["linf_8_x5"]["restarts"]) == (50, 5)
    assert g["l2_1"]["norm"] == "l2" and g["linf_64"]["eps"] == pytest.approx(64 / 255)


def _suite_rows(model, rows):
    """Long suite rows from {attack: [correct per question]} (L-inf radii from the names)."""
    out = []
    for attack, correct in rows.items():
        eps = 0.0 if attack == "clean" else (0.5 if attack.startswith("l2") else
                                              int(attack.split("_")[1]) / 255 if attack.startswith("linf") else 8 / 255)
        norm = "none" if attack == "clean" else ("l2" if attack.startswith("l2") else "linf")
        out += [{"model": model, "attack": attack, "norm": norm, "eps": eps, "question_id": f"q{i}",
                 "correct": c, "pred": "A"} for i, c in enumerate(correct)]
    return out


def test_suite_table_takes_the_worst_case_and_masking_checks_catch_a_stronger_attack_doing_better():
    cfg = config.load("tiny", {"safemed.eval.linf_curve": [64], "safemed.eval.l2_curve": [0.5]})
    good = {"clean": [1, 1, 1, 1], "linf_8": [1, 1, 0, 0], "first_token": [1, 1, 1, 0], "linf_8_x5": [1, 0, 0, 0],
            "linf_64": [0, 0, 0, 0], "l2_0.5": [1, 1, 1, 0]}
    masked = {**good, "linf_8_x5": [1, 1, 1, 0], "linf_64": [1, 1, 1, 1]}  # more steps do better; 64/255 fails
    suite = pd.DataFrame(_suite_rows("ok", good) + _suite_rows("masked", masked))
    table = safemed.suite_table(cfg, suite)
    assert list(table.index) == ["ok", "masked"]
    assert list(table.columns) == ["clean", "PGD-10", "first token (fork)", "PGD-50 x5", "worst case", "n"]
    assert table.loc["ok"].tolist() == [100.0, 50.0, 75.0, 25.0, 25.0, 4]
    assert table.loc["masked", "worst case"] == 50.0  # q0, q1 survive every attack
    checks = safemed.masking_table(cfg, suite, chance=0.25).set_index(["model", "check", "compared"])["passed"]
    assert checks.loc["ok"].all()
    bad = checks.loc["masked"][~checks.loc["masked"].astype(bool)]
    assert sorted(c for c, _ in bad.index) == ["chance", "monotone", "stronger"]
    assert safemed.suite_table(cfg, pd.DataFrame()).empty and safemed.masking_table(cfg, pd.DataFrame(), 0.25).empty


def test_cot_table_pairs_think_with_nothink_per_method():
    q = [f"q{i}" for i in range(10)]
    res = lambda right: pd.DataFrame({"question_id": q, "correct": [i < right for i in range(10)]})  # noqa: E731
    per_model = {"SFT-think": (res(9), res(6)), "SFT-nothink": (res(9), res(2)), "AT-SFT-think": (res(8), res(7))}
    t = safemed.cot_table(per_model)  # AT-SFT has no nothink model: no row
    assert t[["method", "images"]].values.tolist() == [["SFT", "clean"], ["SFT", "PGD"]]
    pgd = t.iloc[1]
    assert (pgd["nothink"], pgd["think"], pgd["diff"], pgd["think_only"], pgd["nothink_only"]) == (20.0, 60.0, 40.0, 4, 0)
    assert pgd["p_value"] == pytest.approx(0.125)  # exact McNemar: 4 discordant pairs, all one way


def test_robustness_claims_verdicts():
    t = pd.DataFrame({"clean": [70.0, 65.0, 60.0, 58.0], "PGD": [30.0, 45.0, 20.0, 25.0]},
                     index=["SFT-think", "AT-GRPO-think", "SFT-nothink", "AT-GRPO-nothink"])
    c = {x["claim_id"]: x for x in safemed.robustness_claims(t, ["think", "nothink"], 28.0, detail="160 Qs")}
    assert c["safemed.atgrpo_robust"]["holds"] is False  # +15 for think, +5 for nothink: not both >= 10
    assert c["safemed.atgrpo_robust"]["ours"] == (
        "AT-GRPO-think 65.0% clean / 45.0% PGD vs SFT-think 70.0% / 30.0%; "
        "AT-GRPO-nothink 58.0% clean / 25.0% PGD vs SFT-nothink 60.0% / 20.0%")
    assert c["safemed.atgrpo_robust"]["detail"].startswith("160 Qs; holds =")
    assert c["safemed.cot_more_robust"]["holds"] is True  # 30 > 20 and 45 > 25
    assert c["safemed.cot_more_robust"]["ours"] == ("SFT: think 30.0% vs nothink 20.0% under PGD; "
                                                    "AT-GRPO: think 45.0% vs nothink 25.0% under PGD")
    assert safemed.robustness_claims(t, ["think"], 28.0)[0]["holds"] is True  # think alone: +15
    t.loc["SFT-nothink", "clean"] = 30.0  # within 10 points of chance: does not read the image
    c = {x["claim_id"]: x for x in safemed.robustness_claims(t, ["think", "nothink"], 28.0)}
    assert c["safemed.atgrpo_robust"]["holds"] is None and c["safemed.cot_more_robust"]["holds"] is None
    c = {x["claim_id"]: x for x in safemed.robustness_claims(t.drop(index=["SFT-nothink", "AT-GRPO-nothink"]),
                                                               ["think"], 28.0)}
    assert c["safemed.cot_more_robust"] == dict(claim_id="safemed.cot_more_robust", holds=None,
                                                ours="no think/nothink pair on this profile",
                                                detail="PGD accuracy, same attack; chance 28.0%")


# --------------------------------------------------------------------------- runs through the zoo
@pytest.fixture(scope="module")
def over(tmp_path_factory):
    """Overrides of the smoke profile (nothink Med-R1): a 16-image benchmark and models under a
    temporary folder, a small base, 1-2 step recipes, 4 evaluation questions."""
    tmp = tmp_path_factory.mktemp("experiments")
    return {"model.dir": str(tmp / "models"), "data.bench_dir": str(tmp / "bench"), "data.n_images": 16,
            "model.tiny.copy_steps": 5, "model.tiny.vision_steps": 5, "sft.nothink.steps": 2,
            "medr1.warmup.steps": 2, "medr1.sft.steps": 1, "medr1.grpo.steps": 1, "medr1.eval_n": 4,
            "safemed.eval.n": 4, "safemed.eval.batch_size": 4}


def _no_model(*_, **__):
    raise AssertionError("the cached results should have been read back without building a model")


@pytest.fixture()
def no_training(monkeypatch):
    """From here on, building or training a model fails the test."""
    monkeypatch.setattr(zoo, "load", _no_model)
    monkeypatch.setattr(zoo, "ensure", _no_model)
    monkeypatch.setattr(sft, "train_sft", _no_model)
    monkeypatch.setattr(grpo, "train_grpo", _no_model)


@pytest.fixture(scope="module")
def protocols(over):
    """``medr1.run`` on the profile (both protocols; the second in a worker process), recording the
    zoo names the main process loads: (cfg, results, times, loaded names)."""
    cfg = config.load("smoke", over)
    loaded, real = [], zoo.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo, "load", lambda name, c, **kw: loaded.append(name) or real(name, c, **kw))
        results, times = medr1.run(cfg)
    return cfg, results, times, loaded


def test_protocols_run_in_a_worker_process_and_are_read_back(protocols):
    """Notebook 04 trains its later protocols in a worker process (``medr1.background``) and reads
    their cached models and records back: the configuration goes to the worker as a dump that must
    pickle and name the same models, and the main process builds none of the worker's models."""
    cfg, results, times, loaded = protocols
    assert cfg.medr1.by == ["modality", "question_type"] and cfg.medr1.background and cfg.medr1.mode == "nothink"
    sent = config.Config.model_validate(pickle.loads(pickle.dumps(cfg.model_dump())))
    assert zoo.key("medr1-question-type-grpo-modality-recognition", sent) == \
        zoo.key("medr1-question-type-grpo-modality-recognition", cfg)
    assert all(not n.startswith("medr1-question-type") for n in loaded), loaded  # trained by the worker
    assert any(n.startswith("medr1-modality") for n in loaded)                   # trained here
    items = medr1.test_items(cfg)
    assert len(items) == 4
    for by in cfg.medr1.by:
        groups = list(zoo.medr1_groups(cfg, by))
        res = results[by]
        assert set(res["train_group"]) == set(groups) | {"(base)"}
        assert len(res) == len(items) * (1 + 2 * len(groups))
        assert set(times.loc[times["by"] == by, "train_group"]) == set(groups)
        assert all(zoo.is_trained(medr1.cell_name(by, m, g), cfg) for m in ("sft", "grpo") for g in groups)


@pytest.mark.parametrize("by", ["modality", "question_type"])
def test_protocol_is_cached_matrices_and_gains(protocols, no_training, by):
    cfg, results, _, _ = protocols
    res, _ = medr1.protocol(cfg, by, progress=None)  # every model and record cached: no model built
    pd.testing.assert_frame_equal(results[by].reset_index(drop=True), res.reset_index(drop=True), check_dtype=False)
    groups = list(zoo.medr1_groups(cfg, by))
    mats = medr1.generalization_matrix(res, by)
    assert list(mats) == ["base", "SFT", "GRPO"] and list(mats["GRPO"].index) == groups
    g0, tested = groups[0], [g for g in mats["GRPO"].columns if g != "All"]
    cell = res.query(f"method == 'GRPO' and train_group == @g0 and {by} == @tested[0]")
    assert len(cell) and mats["GRPO"].loc[g0, tested[0]] == pytest.approx(100 * cell["correct"].mean())
    gains = medr1.generalization_gains(mats)
    expected = (mats["GRPO"].drop(columns="All") - mats["base"].drop(columns="All").iloc[0]).stack().mean()
    assert gains.loc["GRPO - base", "mean gain (points)"] == pytest.approx(expected)


def test_attack_suite_runs_every_attack_on_the_first_questions(over):
    cfg = config.load("smoke", {**over, "safemed.eval.steps": 2, "safemed.eval.suite_n": 2})
    zoo.ensure("grpo-nothink", cfg)
    suite = safemed.attack_suite(cfg, {"GRPO-nothink": ("nothink", "grpo-nothink")}, progress=None)
    attacks = [g["name"] for g in safemed.suite_grid(cfg, "nothink")]
    assert list(suite["attack"].unique()) == ["clean", *attacks] and (suite["model"] == "GRPO-nothink").all()
    first = [it.question_id for it in safemed.eval_items(cfg)[:2]]
    assert all(sorted(d["question_id"]) == sorted(first) for _, d in suite.groupby("attack"))
    linf = suite[suite["norm"] == "linf"]
    assert (linf["attack_linf"] <= linf["eps"] + 1e-6).all() and linf["perturbed"].all()
    assert safemed.suite_table(cfg, suite).loc["GRPO-nothink", "n"] == 2
    with pytest.MonkeyPatch.context() as mp:   # run again: every result is read back, no model is loaded
        mp.setattr(zoo, "load", _no_model)
        again = safemed.attack_suite(cfg, {"GRPO-nothink": ("nothink", "grpo-nothink")}, progress=None)
    assert again["correct"].tolist() == suite["correct"].tolist()


def test_evaluate_model_attacks_and_caches(over, monkeypatch):
    cfg = config.load("smoke", {**over, "safemed.eval.steps": 2})
    zoo.ensure("grpo-nothink", cfg)
    items = safemed.eval_items(cfg)
    assert len(items) == 4
    clean, pgd = safemed.evaluate_model(cfg, "grpo-nothink", "nothink", items)
    eps = cfg.safemed.eval.eps / 255  # the profile's 1/255, the attack's [0, 1] pixels
    assert eps == pytest.approx(8 / 255)
    assert len(clean) == len(pgd) == len(items) and pgd["perturbed"].all() and not clean["perturbed"].any()
    assert (pgd["attack_linf"] <= eps + 1e-6).all() and pgd["rounded_8bit"].all()
    assert (pgd["attack_loss_adv"] >= pgd["attack_loss_clean"] - 1e-4).all()
    loads, real = [], zoo.load
    monkeypatch.setattr(zoo, "load", lambda name, c, **kw: loads.append(name) or real(name, c, **kw))
    clean2, pgd2 = safemed.evaluate_model(cfg, "grpo-nothink", "nothink", items)  # read back from the records
    assert loads == []
    assert clean2["correct"].tolist() == clean["correct"].tolist() and pgd2["pred"].tolist() == pgd["pred"].tolist()
    # another attack radius: the clean results are read back, the PGD ones are computed again (one model load)
    smaller = config.load("smoke", {**over, "safemed.eval.steps": 2, "safemed.eval.eps": 2})
    clean3, pgd3 = safemed.evaluate_model(smaller, "grpo-nothink", "nothink", items)
    assert loads == ["grpo-nothink"]
    assert clean3["output"].tolist() == clean["output"].tolist()
    assert (pgd3["attack_linf"] <= 2 / 255 + 1e-6).all() and pgd3["perturbed"].all()


# --------------------------------------------------------------------------- smoothing: the cost
def test_certify_cost_counts_samples_and_hours_at_a_measured_rate(over):
    from safemed_lib.experiments import smoothing

    cfg = config.load("smoke", {**over, "certify.models": ["sft-nothink", "atgrpo-think"], "certify.sigmas": [0.25, 0.5],
                                "certify.n0": 4, "certify.n": 20, "certify.n_think": 10, "certify.n_items": 3,
                                "certify.n_items_think": 2, "certify.batch_size": 4, "certify.max_new_tokens": 4})
    table = smoothing.cost(cfg, {"sft-nothink": 2.0})
    assert table.loc["sft-nothink", "samples"] == 3 * 2 * (4 + 20)
    assert table.loc["atgrpo-think", "samples"] == 2 * 2 * (4 + 10)
    assert table.loc["sft-nothink", "hours"] == pytest.approx(round(3 * 2 * 24 / 2.0 / 3600, 2))
    assert table.loc["sft-nothink", "classifier"] == "logprob" and table.loc["atgrpo-think", "classifier"] == "generate"
    zoo.ensure("sft-nothink", cfg)
    est = smoothing.estimate(cfg)  # rates measured for the trained models only (no AT-GRPO trained here)
    assert est.loc["sft-nothink", "samples/s"] > 0 and pd.isna(est.loc["atgrpo-think", "samples/s"])


def test_smoothing_claim_is_the_fixed_criterion_on_a_large_enough_sample():
    from safemed_lib.experiments import smoothing

    cfg = config.load("smoke", {"certify.models": ["sft-nothink", "atgrpo-nothink", "sft-think"], "certify.n": 1000,
                                "certify.n_think": 100})

    def overall(rows):
        return pd.DataFrame(rows, columns=["model", "sigma", "n", "cert_acc@0.25", "cert_acc@0.5"]).set_index(
            ["model", "sigma"])
    rows = [("sft-nothink", 0.25, 100, 62.0, 38.0), ("sft-nothink", 0.5, 100, 55.0, 41.0),  # best sigma per radius
            ("atgrpo-nothink", 0.25, 100, 70.0, 20.0), ("sft-think", 0.25, 100, 99.0, 99.0)]  # think: n too small
    c = smoothing.claim(cfg, overall(rows), pd.DataFrame({"x": range(4)}))
    assert c["holds"] is True and c["ours"].startswith("sft-nothink: 62.0% certified at r = 0.25 (target 60%), "
                                                       "41.0% certified at r = 0.5 (target 40%)")
    rows[1] = ("sft-nothink", 0.5, 100, 55.0, 39.9)
    assert smoothing.claim(cfg, overall(rows), pd.DataFrame())["holds"] is False
    small = [(m, s, 99, a, b) for m, s, _, a, b in rows]                                  # 99 items: cannot tell
    assert smoothing.claim(cfg, overall(small), pd.DataFrame())["holds"] is None


def test_certification_runs_half_the_models_in_a_worker_and_reads_them_back(over, monkeypatch):
    from safemed_lib import certify, evaluate
    from safemed_lib.experiments import smoothing

    cfg = config.load("smoke", {**over, "certify.models": ["sft-nothink", "grpo-nothink"], "certify.n_items": 2,
                                "certify.n": 8, "certify.n0": 4, "certify.background": True,
                                "certify.attack": {"items": 2, "steps": 2, "m": 2, "n": 8, "radii": [0.25, 0.5]}})
    zoo.ensure("grpo-nothink", cfg)
    assert smoothing._samples(cfg, "sft-nothink") == smoothing._samples(cfg, "grpo-nothink")
    computed, real = [], certify.certify_items
    monkeypatch.setattr(certify, "certify_items", lambda vlm, *a, **kw: (
        computed.append(kw["model_id"]) if not isinstance(vlm, evaluate._Recorded) else None) or real(vlm, *a, **kw))
    certs, skipped = smoothing.run(cfg)
    assert skipped == [] and sorted(certs["model"].unique()) == ["grpo-nothink", "sft-nothink"]
    assert len(certs) == 2 * 2 and (certs["noise_drawn"] == "embedding").all()
    assert computed == [zoo.fingerprint("sft-nothink", cfg)]   # the other model was certified by the worker
    monkeypatch.setattr(zoo, "load", _no_model)                  # ... and attacked there: read back
    attacked = smoothing.attacks(cfg, certs)
    assert sorted(attacked["model"].unique()) == ["grpo-nothink", "sft-nothink"] and len(attacked) == 2 * 2 * 2
    assert (attacked["l2"] <= attacked["radius"] + 1e-6).all()
    table = smoothing.soundness_table(attacked)
    assert table["n"].tolist() == [2] * 4 and (table["violations"] == 0).all()


def test_stages_table_pairs_each_model_with_sft_of_its_form_on_certified_hits():
    from safemed_lib.experiments import smoothing

    def rows(model, radii, correct):
        return pd.DataFrame({"model": model, "sigma": 0.25, "question_id": [f"q{i}" for i in range(len(radii))],
                             "radius": radii, "correct": correct})
    certs = pd.concat([rows("sft-nothink", [0.3, 0.3, 0.1, 0.6, 0.0, 0.6], [True, True, True, True, False, True]),
                       rows("sftnoise-nothink", [0.6, 0.6, 0.6, 0.6, 0.6, 0.0], [True, True, True, True, True, False]),
                       rows("sft-think", [0.3] * 6, [True] * 6)])
    t = smoothing.stages_table(config.load("smoke", {}), certs)
    assert t[["model", "against", "radius"]].values.tolist() == [["sftnoise-nothink", "sft-nothink", 0.25],
                                                                 ["sftnoise-nothink", "sft-nothink", 0.5]]
    at25, at50 = t.iloc[0], t.iloc[1]
    assert (at25["cert_acc_against"], at25["cert_acc"]) == (66.7, 83.3)   # q2 (radius 0.1) and q4 (wrong) vs q5
    assert (at50["cert_acc_against"], at50["cert_acc"], at50["diff"]) == (33.3, 83.3, 50.0)
