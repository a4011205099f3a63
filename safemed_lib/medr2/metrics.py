"""Stepwise metrics: stage, chain and conditional accuracy, flip rates, degradation, summary.

Every function takes the tidy tables of :mod:`safemed_lib.medr2.run` and returns a pandas table
with accuracies in %.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..evaluate import mcnemar_p
from .cues import CUES, MISLEADING_TEXT, MISLEADING_VISUAL


def _by(by) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table has no column(s) {missing}")
    if df.empty:
        raise ValueError(f"{what}: empty table")


def stage_accuracy(df: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy (%) and item count per stage (and per group of ``by``): columns [*by, k, stage, n, accuracy]."""
    by = _by(by)
    _need(df, [*by, "k", "stage", "correct"], "stage_accuracy")
    out = (df.assign(correct=df["correct"].astype(bool)).groupby([*by, "k", "stage"], sort=True)["correct"]
           .agg(n="size", accuracy="mean").reset_index())
    out["accuracy"] *= 100.0
    return out


def _per_case(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """case x stage table of correctness (rows [*by, case_id], columns k)."""
    dup = df.duplicated([*by, "case_id", "k"])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(f"more than one row for case {r['case_id']!r} stage {r['k']} "
                         f"(within the groups {by or 'of the whole table'}); pass by= to separate runs")
    return df.assign(correct=df["correct"].astype(bool)).pivot_table(
        index=[*by, "case_id"], columns="k", values="correct", aggfunc="first")


def chain_accuracy(df: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Share (%) of cases with every stage right. Per group of ``by``, the stages are those present
    in the group; a case missing one of them is left out (counted in ``n_incomplete``).
    Columns [*by, n_stages, n_cases, n_incomplete, chain_accuracy]."""
    by = _by(by)
    _need(df, [*by, "case_id", "k", "correct"], "chain_accuracy")
    groups = df.groupby(by, sort=True) if by else [((), df)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        wide = _per_case(g, [])
        complete = wide.notna().all(axis=1)
        full = wide[complete].astype(bool)
        rows.append({**dict(zip(by, key)), "n_stages": wide.shape[1], "n_cases": int(complete.sum()),
                     "n_incomplete": int((~complete).sum()),
                     "chain_accuracy": 100.0 * full.all(axis=1).mean() if len(full) else float("nan")})
    return pd.DataFrame(rows)


def conditional_accuracy(df: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy (%) at stage k among the cases whose stage k-1 is right, for k >= 1, beside the
    plain accuracy at k on the same cases. Columns [*by, k, stage, n, n_prev_right, accuracy,
    accuracy_given_prev]."""
    by = _by(by)
    _need(df, [*by, "case_id", "k", "stage", "correct"], "conditional_accuracy")
    names = df.drop_duplicates("k").set_index("k")["stage"].to_dict()
    groups = df.groupby(by, sort=True) if by else [((), df)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        wide = _per_case(g, [])
        for k in sorted(wide.columns):
            if k - 1 not in wide.columns:
                continue
            both = wide[[k - 1, k]].dropna().astype(bool)
            prev = both[both[k - 1]]
            rows.append({**dict(zip(by, key)), "k": k, "stage": names[k], "n": len(both),
                         "n_prev_right": len(prev), "accuracy": 100.0 * both[k].mean() if len(both) else float("nan"),
                         "accuracy_given_prev": 100.0 * prev[k].mean() if len(prev) else float("nan")})
    return pd.DataFrame(rows)


def flip_rates(clean: pd.DataFrame, cued: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """How cues change answers, per cue and stage (and an "all" row per cue).

    Rows of ``cued`` are matched to ``clean`` rows on [*by, case_id, k] (run the clean baseline with
    the same context). ``flip_rate``: % of the items right when clean that are wrong under the cue;
    ``fix_rate``: % of the items wrong when clean that are right under it; ``follow_rate``: % of the
    items whose cue suggests a letter (``cue_target``) where the model answers that letter;
    ``p_value``: the exact McNemar p-value of ``delta`` (fixes against flips: the items are paired).
    Columns [*by, cue, k, stage, n, accuracy_clean, accuracy_cue, delta, n_right_clean, flip_rate,
    fix_rate, follow_rate, p_value]."""
    by = _by(by)
    keys = [*by, "case_id", "k"]
    _need(clean, [*keys, "stage", "correct"], "flip_rates (clean)")
    _need(cued, [*keys, "cue", "correct", "pred"], "flip_rates (cued)")
    if clean.duplicated(keys).any():
        raise ValueError(f"flip_rates: the clean table has several rows per {keys}; pass by=")
    base = clean[[*keys, "stage", "correct"]].rename(columns={"correct": "correct_clean"})
    cols = [*keys, "cue", "correct", "pred"] + (["cue_target"] if "cue_target" in cued.columns else [])
    m = cued[cols].merge(base, on=keys, how="left", validate="many_to_one")
    if m["correct_clean"].isna().any():
        r = m[m["correct_clean"].isna()].iloc[0]
        raise ValueError(f"flip_rates: cued row {r['case_id']!r} stage {r['k']} has no clean row")
    m["correct"] = m["correct"].astype(bool)
    m["correct_clean"] = m["correct_clean"].astype(bool)
    if "cue_target" not in m.columns:
        m["cue_target"] = None

    def stats(g: pd.DataFrame) -> dict:
        right, wrong = g[g["correct_clean"]], g[~g["correct_clean"]]
        tgt = g[g["cue_target"].notna()]
        return {"n": len(g), "accuracy_clean": 100.0 * g["correct_clean"].mean(),
                "accuracy_cue": 100.0 * g["correct"].mean(),
                "delta": 100.0 * (g["correct"].mean() - g["correct_clean"].mean()),
                "n_right_clean": len(right),
                "flip_rate": 100.0 * (~right["correct"]).mean() if len(right) else float("nan"),
                "fix_rate": 100.0 * wrong["correct"].mean() if len(wrong) else float("nan"),
                "follow_rate": 100.0 * (tgt["pred"] == tgt["cue_target"]).mean() if len(tgt) else float("nan"),
                "p_value": mcnemar_p(int(wrong["correct"].sum()), int((~right["correct"]).sum()))}

    rows = []
    for key, g in m.groupby([*by, "cue"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        head = dict(zip([*by, "cue"], key))
        for (k, stage), gs in g.groupby(["k", "stage"], sort=True):
            rows.append({**head, "k": k, "stage": stage, **stats(gs)})
        rows.append({**head, "k": -1, "stage": "all", **stats(g)})
    return pd.DataFrame(rows)


def stage_degradation(df: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy per stage with its drop from the first stage (points) and the least-squares slope
    of accuracy over the stage index (points per stage; negative = degrades along the workflow).
    Columns [*by, k, stage, n, accuracy, drop_from_first, slope]."""
    by = _by(by)
    acc = stage_accuracy(df, by)
    frames = []
    for _, g in (acc.groupby(by, sort=False) if by else [((), acc)]):
        g = g.sort_values("k").copy()
        g["drop_from_first"] = g["accuracy"] - g["accuracy"].iloc[0]
        g["slope"] = float(np.polyfit(g["k"], g["accuracy"], 1)[0]) if len(g) > 1 else float("nan")
        frames.append(g)
    return pd.concat(frames, ignore_index=True)


def summary_table(res: pd.DataFrame, by: str | Sequence[str] = "model") -> pd.DataFrame:
    """One row per group (model) of a :func:`run_suite` table: the headline numbers (%).

    ``chain_stage_acc`` / ``chain_accuracy`` / ``slope``: the clean chain (model context; slope of
    accuracy over stages, points per stage); ``acc_none`` / ``acc_gold``: mean stage accuracy asked
    alone / after the gold answers; ``flip_<cue>``: flip rate of each cue and of each attack label
    (over all stages, gold context); ``flip_misleading_text`` / ``flip_misleading_visual``: the mean
    flip rate of the misleading text cues / of the wrong box and coordinates (``cues.MISLEADING_*``); ``gain_<cue>``: accuracy change for the
    helpful cues (hint_right, box_true, coords_true)."""
    by = _by(by)
    _need(res, [*by, "cue", "context", "case_id", "k", "stage", "correct"], "summary_table")
    clean = res[res["cue"] == "clean"]
    out = {}
    for key, g in clean.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {}
        chain = g[g["context"] == "model"]
        if len(chain):
            row["chain_stage_acc"] = 100.0 * chain["correct"].astype(bool).mean()
            row["chain_accuracy"] = chain_accuracy(chain).loc[0, "chain_accuracy"]
            row["slope"] = stage_degradation(chain).loc[0, "slope"]
        for ctx in ("none", "gold"):
            sub = g[g["context"] == ctx]
            if len(sub):
                row[f"acc_{ctx}"] = 100.0 * sub["correct"].astype(bool).mean()
        out[key] = row
    cued = res[(res["cue"] != "clean") & (res["context"] == "gold")]
    gold = clean[clean["context"] == "gold"]
    if len(cued) and len(gold):
        fr = flip_rates(gold, cued, by=by)
        fr = fr[fr["stage"] == "all"]
        for _, r in fr.iterrows():
            key = tuple(r[b] for b in by)
            row = out.setdefault(key, {})
            row[f"flip_{r['cue']}"] = r["flip_rate"]
            if r["cue"] in CUES and not CUES[r["cue"]].misleading and r["cue"] != "neutral":
                row[f"gain_{r['cue']}"] = r["delta"]
        for key, row in out.items():
            for group, names in (("text", MISLEADING_TEXT), ("visual", MISLEADING_VISUAL)):
                vals = [row[f"flip_{c}"] for c in names if f"flip_{c}" in row]
                if vals:
                    row[f"flip_misleading_{group}"] = float(np.mean(vals))
    index = (pd.Index([k[0] for k in out], name=by[0]) if len(by) == 1
             else pd.MultiIndex.from_tuples(list(out), names=by))
    return pd.DataFrame(list(out.values()), index=index)
