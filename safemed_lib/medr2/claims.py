"""Med-R2's four qualitative findings tested on one run, as claims for report.record_claim."""
from __future__ import annotations

import pandas as pd

from .metrics import _need

CLAIM_MIN_ACC = 35.0  # a model counts for Med-R2's findings above this mean gold-context stage accuracy (chance 25%)


def medr2_claims(summary: pd.DataFrame, flips: pd.DataFrame | None = None, min_acc: float = CLAIM_MIN_ACC
                 ) -> list[dict]:
    """Med-R2's four qualitative findings tested on one run, as keyword arguments for
    ``report.record_claim`` (claim_id, ours, holds, detail).

    ``summary``: :func:`summary_table` by model; ``flips``: :func:`flip_rates` by model (its "all"
    rows: how often a wrong hint's letter is taken, averaged over the models). The tests were
    fixed before looking at the numbers. Only models whose mean stage accuracy after the gold
    answers (``acc_gold``) is above ``min_acc`` count; with none, every verdict is None ("cannot
    tell") and the numbers shown are means over all models.
    - *stage degradation* holds when most of those models' clean-chain slope is negative;
    - *misleading cues* hold when the misleading text cues flip more right answers than the neutral
      sentence does;
    - *visual cues help little* holds when drawing the true box raises accuracy by under 5 points;
    - *stepwise fine-tuning* holds when r2-stepwise's mean flip rate over the misleading cues (text
      and visual) is below r2-plain's (both models above ``min_acc``).
    """
    _need(summary.reset_index(), ["acc_gold"], "medr2_claims (summary)")
    informative = summary[summary["acc_gold"] > min_acc]
    basis = informative if len(informative) else summary
    some = len(informative) > 0

    def mean_of(col):
        return float(basis[col].mean()) if col in basis.columns and len(basis) else float("nan")

    slopes = informative["slope"].dropna() if "slope" in informative.columns else pd.Series(dtype=float)
    ours = "; ".join(f"{m}: {r['chain_accuracy']:.0f}% chain, slope {r['slope']:+.1f} pts/stage"
                     for m, r in summary.iterrows() if pd.notna(r.get("slope")))
    claims = [dict(claim_id="medr2.stage_degradation", ours=ours,
                   holds=bool((slopes < 0).sum() > len(slopes) / 2) if len(slopes) else None,
                   detail=f"{(slopes < 0).sum()}/{len(slopes)} models above chance degrade along the 4 stages "
                          "(clean chain, model context)")]

    mis, neu = mean_of("flip_misleading_text"), mean_of("flip_neutral")
    if flips is not None and "stage" in flips.columns:
        flips = flips[flips["stage"] == "all"]
    follow = (flips.loc[flips["cue"] == "hint_wrong", "follow_rate"].mean() if flips is not None
              else float("nan"))
    claims.append(dict(claim_id="medr2.misleading_cues",
                       ours=f"misleading text cues flip {mis:.1f}% of right answers (neutral sentence: {neu:.1f}%); "
                            f"a wrong hint's letter is taken {follow:.1f}% of the time",
                       holds=None if not some or pd.isna(mis) or pd.isna(neu) else bool(mis > neu),
                       detail="mean over the models above chance (all models if none); gold context; all stages"))

    gain_box, gain_hint = mean_of("gain_box_true"), mean_of("gain_hint_right")
    claims.append(dict(claim_id="medr2.visual_cues",
                       ours=f"true box drawn: {gain_box:+.1f} points; right text hint: {gain_hint:+.1f} points; "
                            f"wrong box flips {mean_of('flip_misleading_visual'):.1f}%",
                       holds=None if not some or pd.isna(gain_box) else bool(gain_box < 5.0),
                       detail="mean accuracy change over the models above chance (all models if none); gold context"))

    pair = ("r2-stepwise", "r2-plain")
    misleading = [c for c in ["flip_misleading_text", "flip_misleading_visual"] if c in summary.columns]
    if set(pair) <= set(summary.index) and misleading:
        step, plain = (float(summary.loc[m, misleading].mean()) for m in pair)
        holds = bool(step < plain) if set(pair) <= set(informative.index) else None
        ours = (f"mean misleading-cue flip rate: stepwise {step:.1f}% vs plain {plain:.1f}%; chain accuracy "
                f"{summary.loc[pair[0], 'chain_accuracy']:.1f}% vs {summary.loc[pair[1], 'chain_accuracy']:.1f}%")
    else:
        holds, ours = None, "stepwise / plain models not evaluated"
    claims.append(dict(claim_id="medr2.stepwise_ft", ours=ours, holds=holds,
                       detail="same start model, images and steps"))
    return claims
