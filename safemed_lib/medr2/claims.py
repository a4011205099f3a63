"""Med-R2's four findings as claims with criteria fixed before the run, decided by paired tests.

:func:`medr2_claims` takes one run's per-item results (``run_suite`` rows with a ``model`` column) and
returns the claims (keyword arguments for ``report.record_claim``) and the table of every test they
rest on. A model counts ("competent") when its gold-context accuracy is at least ``min_acc`` at every
stage; the verdicts read only competent models, and with none they are None ("cannot tell").

- *stage degradation*: a competent model degrades when its chain (own earlier answers) is less often
  right at the last stage than at the first, paired over cases (exact McNemar, p < ``alpha``), and
  its least-squares slope over the stages is negative; holds when most competent models degrade.
- *reliance on prompts*: a model relies on the prompt when some misleading text cue (a wrong hint,
  context or authority; boxes and coordinates are the visual cues) leaves it wrong
  more often than the neutral sentence does on the same items (exact McNemar, Holm over the cues,
  p < ``alpha``); holds when most competent models do.
- *visual cues not used*: a model uses a visual cue when a true box or true coordinates make it
  right more often than the clean question (exact McNemar, p < ``alpha``); holds when no competent
  model does.
- *stepwise fine-tuning is more robust*: for each training seed, ``r2-stepwise[-s<k>]`` against
  ``r2-plain[-s<k>]`` on the misleading cues' items (text, wrong box, wrong coordinates) right for both
  models without a cue: the items each model flips to wrong (exact McNemar); holds when stepwise
  flips fewer in every seed and the test over all seeds together has p < ``alpha``.
"""
from __future__ import annotations

import re

import pandas as pd
from statsmodels.stats.multitest import multipletests

from ..evaluate import mcnemar_p
from .cues import MISLEADING_TEXT, MISLEADING_VISUAL, TRUE_VISUAL
from .metrics import _need, stage_degradation

CLAIM_MIN_ACC = 35.0  # gold-context accuracy (%) a model needs at every stage to count (chance 25%)
ALPHA = 0.05


def _paired(a: pd.Series, b: pd.Series) -> dict:
    """Exact McNemar of two boolean series on the same index: ``b_only`` right only under b."""
    a, b = a.astype(bool), b.astype(bool)
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    return {"n": len(a), "acc_a": 100.0 * a.mean(), "acc_b": 100.0 * b.mean(), "a_only": a_only, "b_only": b_only,
            "p_value": mcnemar_p(b_only, a_only)}


def _items(res: pd.DataFrame, model: str, cue: str, context: str = "gold") -> pd.Series:
    g = res[(res["model"] == model) & (res["cue"] == cue) & (res["context"] == context)]
    return g.set_index(["case_id", "k"])["correct"].astype(bool)


def competent(res: pd.DataFrame, min_acc: float = CLAIM_MIN_ACC) -> dict[str, bool]:
    """Per model: gold-context accuracy at least ``min_acc`` at every stage (clean questions)."""
    gold = res[(res["cue"] == "clean") & (res["context"] == "gold")]
    acc = gold.groupby(["model", "stage"])["correct"].mean().mul(100).unstack()
    return {m: bool((row >= min_acc).all()) for m, row in acc.iterrows()}


def _seed_pairs(models) -> list[tuple[str, str, str]]:
    """(seed label, stepwise name, plain name) for every seed with both models."""
    out = []
    for m in models:
        hit = re.fullmatch(r"r2-stepwise(-s\d+)?", m)
        if hit and f"r2-plain{hit.group(1) or ''}" in models:
            out.append((hit.group(1) or "-s0", m, f"r2-plain{hit.group(1) or ''}"))
    return sorted(out)


def against_neutral(res: pd.DataFrame) -> pd.DataFrame:
    """Every cue against the neutral sentence, per model (gold context, same items; exact McNemar):
    columns model, cue, n, acc_neutral, acc_cue, delta (points), p_value."""
    rows = []
    for m in dict.fromkeys(res["model"]):
        ref = _items(res, m, "neutral")
        for cue in dict.fromkeys(res.loc[(res["model"] == m) & (res["context"] == "gold"), "cue"]):
            if cue in ("clean", "neutral"):
                continue
            cued = _items(res, m, cue)
            common = ref.index.intersection(cued.index)
            if len(common):
                t = _paired(ref[common], cued[common])
                rows.append({"model": m, "cue": cue, "n": t["n"], "acc_neutral": t["acc_a"], "acc_cue": t["acc_b"],
                             "delta": t["acc_b"] - t["acc_a"], "p_value": t["p_value"]})
    return pd.DataFrame(rows)


def tests_table(res: pd.DataFrame, min_acc: float = CLAIM_MIN_ACC) -> pd.DataFrame:
    """Every paired test the claims read: one row per (test, model, condition)."""
    _need(res, ["model", "cue", "context", "case_id", "k", "stage", "correct"], "medr2 claims")
    ok = competent(res, min_acc)
    rows = []
    models = list(dict.fromkeys(res["model"]))
    for m in models:
        chain = res[(res["model"] == m) & (res["cue"] == "clean") & (res["context"] == "model")]
        if len(chain):
            first, last = chain["k"].min(), chain["k"].max()
            a = chain[chain["k"] == first].set_index("case_id")["correct"]
            b = chain[chain["k"] == last].set_index("case_id")["correct"].reindex(a.index)
            rows.append({"test": "stage_degradation", "model": m, "condition": "chain: last vs first stage",
                         "slope": float(stage_degradation(chain).loc[0, "slope"]), **_paired(a, b.fillna(False))})
        for test, against, cues in (("misleading_cues", "neutral", MISLEADING_TEXT), ("visual_cues", "clean", TRUE_VISUAL)):
            ref = _items(res, m, against)
            for cue in cues:
                cued = _items(res, m, cue)
                common = ref.index.intersection(cued.index)
                if len(common):
                    rows.append({"test": test, "model": m, "condition": f"{cue} vs {against}",
                                 **_paired(ref[common], cued[common])})
    for label, step, plain in _seed_pairs(models):
        flips = {}
        for name in (step, plain):
            clean = _items(res, name, "clean")
            for cue in (*MISLEADING_TEXT, *MISLEADING_VISUAL):
                cued = _items(res, name, cue)
                flips.setdefault(name, []).append(
                    pd.DataFrame({"right": clean.reindex(cued.index), "cued": cued}).assign(cue=cue))
        s, p = (pd.concat(flips[n]).set_index("cue", append=True) for n in (step, plain))
        both = s.index[(s["right"] == True) & (p["right"].reindex(s.index) == True)]  # noqa: E712
        # "correct" here is "not flipped": McNemar counts the items only one of the two keeps right
        rows.append({"test": "stepwise_ft", "model": f"{step} vs {plain}", "condition": f"seed {label[2:]}",
                     **_paired(p.loc[both, "cued"], s.loc[both, "cued"])})
    out = pd.DataFrame(rows)
    if len(out):
        out["competent"] = out["model"].map(lambda m: all(ok.get(x, False) for x in m.split(" vs ")))
        mis = out["test"] == "misleading_cues"
        for m, g in out[mis].groupby("model"):
            out.loc[g.index, "p_holm"] = multipletests(g["p_value"], method="holm")[1]
    return out


def medr2_claims(res: pd.DataFrame, min_acc: float = CLAIM_MIN_ACC, alpha: float = ALPHA
                 ) -> tuple[list[dict], pd.DataFrame]:
    """(the four claims as ``report.record_claim`` keyword arguments, :func:`tests_table`)."""
    t = tests_table(res, min_acc)
    ok = competent(res, min_acc)
    good = [m for m, v in ok.items() if v]
    note = f"competent models (gold-context accuracy >= {min_acc:g}% at every stage): {', '.join(good) or 'none'}"

    def rows(test, competent_only=True):
        if t.empty:
            return t
        g = t[t["test"] == test]
        return g[g["competent"]] if competent_only else g

    def majority(flags: dict) -> bool | None:
        return None if not flags else bool(sum(flags.values()) > len(flags) / 2)

    d = rows("stage_degradation")
    degrades = {r.model: bool(r.slope < 0 and r.b_only < r.a_only and r.p_value < alpha) for r in d.itertuples()}
    claims = [dict(claim_id="medr2.stage_degradation", holds=majority(degrades),
                   ours="; ".join(f"{r.model}: first {r.acc_a:.0f}% -> last {r.acc_b:.0f}% (p = {r.p_value:.3g}), "
                                  f"slope {r.slope:+.1f} pts/stage" for r in d.itertuples()) or "no competent model",
                   detail=f"{sum(degrades.values())}/{len(degrades)} degrade; {note}")]

    m = rows("misleading_cues")
    relies = {mod: bool(((g["a_only"] > g["b_only"]) & (g["p_holm"] < alpha)).any()) for mod, g in m.groupby("model")}
    claims.append(dict(claim_id="medr2.misleading_cues", holds=majority(relies),
                       ours="; ".join(f"{mod}: " + ", ".join(
                           f"{r.condition.split()[0]} {r.acc_b - r.acc_a:+.1f} pts (Holm p = {r.p_holm:.2g})"
                           for r in g.itertuples()) for mod, g in m.groupby("model", sort=False)) or "no competent model",
                       detail=f"{sum(relies.values())}/{len(relies)} rely on misleading text; accuracy under each "
                              f"cue against the neutral sentence, gold context; {note}"))

    v = rows("visual_cues")
    uses = {mod: bool(((g["b_only"] > g["a_only"]) & (g["p_value"] < alpha)).any()) for mod, g in v.groupby("model")}
    claims.append(dict(claim_id="medr2.visual_cues", holds=None if not uses else not any(uses.values()),
                       ours="; ".join(f"{mod}: " + ", ".join(
                           f"{r.condition.split()[0]} {r.acc_b - r.acc_a:+.1f} pts (p = {r.p_value:.2g})"
                           for r in g.itertuples()) for mod, g in v.groupby("model", sort=False)) or "no competent model",
                       detail=f"{sum(uses.values())}/{len(uses)} gain significantly from a true visual cue; {note}"))

    s = rows("stepwise_ft", competent_only=False)
    if s.empty:
        holds, ours = None, "stepwise / plain models not evaluated"
    elif not s["competent"].all():
        holds, ours = None, "a stepwise or plain model is not competent at every stage"
    else:
        lower = bool((s["acc_b"] > s["acc_a"]).all())  # stepwise keeps more right, i.e. flips fewer, in every seed
        pooled = mcnemar_p(int(s["b_only"].sum()), int(s["a_only"].sum()))
        holds = bool(lower and s["b_only"].sum() > s["a_only"].sum() and pooled < alpha)
        ours = ("; ".join(f"{r.condition}: stepwise flips {100 - r.acc_b:.1f}% vs plain {100 - r.acc_a:.1f}% "
                          f"(p = {r.p_value:.2g}, {r.n} items)" for r in s.itertuples())
                + f"; all seeds together p = {pooled:.2g}")
    claims.append(dict(claim_id="medr2.stepwise_ft", holds=holds, ours=ours,
                       detail="misleading text cues, wrong box and wrong coordinates, items right for both models without a cue; "
                              "same start model, images, recipe and steps per seed"))
    return claims, t
