"""Med-R1's generalization protocols (notebook 04): one SFT and one GRPO model per modality / question type.

For every group of ``data.cross_splits`` (the 8 modalities, the 5 question types) an SFT and a
GRPO model are trained on that group's training questions from the same base (the zoo's
``medr1-warmup``: Med-R1 starts from a general model never trained on OmniMedVQA) and evaluated,
with the base, on ALL test questions: the rows of the 8x8 and 5x5 matrices.

    results = medr1.protocol(cfg, "modality")      # per-item rows: method, train_group, ...
    matrices = medr1.matrix(results, "modality")   # {"base", "SFT", "GRPO"}: accuracy (%) tables
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .. import data, dataset, evaluate, report, zoo
from ..workbook import background


def test_items(cfg) -> list:
    """The test questions every model of the protocol is scored on (``medr1.eval_n``; 0: all)."""
    _, test = dataset.splits(cfg)
    return evaluate.subset(test, cfg.medr1.eval_n, seed=cfg.seed)


def _evaluate(cfg, name: str, items: list) -> pd.DataFrame:
    m = cfg.medr1
    return evaluate.cached(lambda: zoo.load(name, cfg), items, zoo.run_dir(name, cfg) / "eval-test",
                           model_key=zoo.key(name, cfg), prompt=m.mode, image_size=cfg.data.image_size,
                           batch_size=m.eval_batch_size, max_new_tokens=m.grpo.max_completion_length, desc=name)


def cell_name(by: str, method: str, group: str) -> str:
    """The zoo name of one cell's model (``method``: "sft" or "grpo")."""
    return f"medr1-{by.replace('_', '-')}-{method}-{zoo.slug(group)}"


def protocol(cfg, by: str, progress=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One protocol (``by``: "modality" or "question_type"): every cell trained (through the zoo)
    and evaluated with the base on the test questions. Returns (per-item results with ``method``
    = "base" / "SFT" / "GRPO" and ``train_group`` added to evaluate's rows, seconds per model)."""
    items = test_items(cfg)
    frames = [_evaluate(cfg, "medr1-warmup", items).assign(method="base", train_group="(base)")]
    times = []
    for group, train in zoo.medr1_groups(cfg, by).items():
        for method in ("SFT", "GRPO"):
            t0 = time.perf_counter()
            frames.append(_evaluate(cfg, cell_name(by, method.lower(), group), items)
                          .assign(method=method, train_group=group))
            times.append({"method": method, "train_group": group, "seconds": time.perf_counter() - t0})
        if progress:
            acc = [f"{100 * f['correct'].mean():.1f}%" for f in frames[-2:]]
            progress(f"{by}={group}: {len(train)} training items; accuracy on all test items: "
                     f"SFT {acc[0]}, GRPO {acc[1]} ({times[-2]['seconds'] + times[-1]['seconds']:.0f} s)")
    return pd.concat(frames, ignore_index=True), pd.DataFrame(times)


def _protocol_in_worker(cfg_dump: dict, by: str) -> None:
    from ..config import Config

    protocol(Config.model_validate(cfg_dump), by, progress=None)


def run(cfg) -> tuple[dict, pd.DataFrame]:
    """Every protocol of ``medr1.by``: ({by: per-item results}, seconds per model). With
    ``medr1.background`` the protocols after the first run in their own process meanwhile (their
    models and records are cached, so they are read back here)."""
    zoo.ensure("medr1-warmup", cfg)
    later = cfg.medr1.by[1:] if cfg.medr1.background else []
    jobs = {by: background(_protocol_in_worker, cfg.model_dump(), by, threads=cfg.threads) for by in later}
    results, timings = {}, []
    for by in cfg.medr1.by:
        if by in jobs:
            jobs[by].result()  # re-raises the worker's error here
        results[by], t = protocol(cfg, by)
        timings.append(t.assign(by=by))
    return results, pd.concat(timings, ignore_index=True)


def generalization_matrix(results: pd.DataFrame, by: str) -> dict:
    """Accuracy (%) matrices from :func:`generalization_runs`' results: ``{method: DataFrame}``
    with rows = training group, columns = test group (+ "All"); the base model is one row."""
    groups = data.MODALITIES if by == "modality" else data.QUESTION_TYPES
    out = {}
    for method, df in results.groupby("method", sort=False):
        m = (df.groupby(["train_group", by])["correct"].mean().unstack(by) * 100)
        cols = [g for g in groups if g in m.columns]
        m = m[cols]
        m["All"] = df.groupby("train_group")["correct"].mean() * 100
        rows = [g for g in groups if g in m.index] + [r for r in m.index if r not in groups]
        out[method] = m.loc[rows]
    return out


def generalization_gains(matrices: dict) -> pd.DataFrame:
    """Med-R1's headline numbers: the mean over all (train, test) cells of each method's accuracy
    minus the base's accuracy on the test group, and GRPO minus SFT (percentage points)."""
    base = matrices["base"].drop(columns="All").iloc[0]
    rows = []
    for method in ("SFT", "GRPO"):
        m = matrices[method].drop(columns="All")
        rows.append({"comparison": f"{method} - base", "mean gain (points)": float((m - base).stack().mean()),
                     "diagonal (in-group) gain": float(pd.Series([m.loc[g, g] - base[g] for g in m.index
                                                                   if g in m.columns]).mean()),
                     "off-diagonal gain": float(pd.Series([m.loc[g, h] - base[h] for g in m.index
                                                            for h in m.columns if g != h]).mean())})
    d = matrices["GRPO"].drop(columns="All") - matrices["SFT"].drop(columns="All")
    rows.append({"comparison": "GRPO - SFT", "mean gain (points)": float(d.stack().mean()),
                 "diagonal (in-group) gain": float(pd.Series([d.loc[g, g] for g in d.index if g in d.columns]).mean()),
                 "off-diagonal gain": float(pd.Series([d.loc[g, h] for g in d.index for h in d.columns
                                                       if g != h]).mean())})
    return pd.DataFrame(rows).set_index("comparison")


def generalization_tests(results, alpha: float = 0.05) -> pd.DataFrame:
    """Per training group, paired tests (``evaluate.paired_test``: the accuracy difference on all
    test questions with its interval and the exact McNemar p-value) of SFT vs the base, GRPO vs
    the base and GRPO vs SFT. ``results``: :func:`generalization_runs`' per-item results. One row
    per (train_group, comparison), in the order the groups were trained."""
    base = results[results["method"] == "base"]
    rows = []
    for group in results.loc[results["method"] != "base", "train_group"].unique():
        cell = {m: results[(results["method"] == m) & (results["train_group"] == group)] for m in ("SFT", "GRPO")}
        for name, a, b in (("SFT - base", base, cell["SFT"]), ("GRPO - base", base, cell["GRPO"]),
                           ("GRPO - SFT", cell["SFT"], cell["GRPO"])):
            t = evaluate.paired_test(a, b, alpha=alpha)
            rows.append({"train_group": group, "comparison": name, "diff (points)": t["diff"],
                         "ci_low": t["ci_low"], "ci_high": t["ci_high"], "p_value": t["p_value"], "n": t["n"]})
    return pd.DataFrame(rows)


GENERALIZATION_CLAIMS = {"modality": "medr1.cross_modality_gain", "question_type": "medr1.cross_qtype_gain"}


def generalization_claims(matrices: dict, chance: float, *, min_gain: float = report.MATERIAL_GAIN, detail: str = ""
                          ) -> list[dict]:
    """Med-R1's two headline claims tested on notebook 04's matrices, as keyword arguments for
    ``report.record_claim`` (claim_id, ours, holds, detail).

    ``matrices``: {by: :func:`generalization_matrix` output} for "modality" and/or "question_type";
    ``chance``: the chance accuracy (%). The claim holds when GRPO's mean gain over the base is at
    least ``min_gain`` points (the paper's is about 30; 10 is the same material gain notebook 05
    asks of AT-GRPO). If GRPO's mean accuracy is within 10 points of chance, its models do not read
    the image, and the verdict is None ("cannot tell")."""
    claims = []
    for by, claim_id in GENERALIZATION_CLAIMS.items():
        if by not in matrices:
            continue
        g = generalization_gains(matrices[by])["mean gain (points)"]
        acc = float(matrices[by]["GRPO"]["All"].mean())
        claims.append(dict(
            claim_id=claim_id, holds=bool(g["GRPO - base"] >= min_gain) if report.reads_image(acc, chance) else None,
            ours=f"GRPO - base {g['GRPO - base']:+.2f} points (SFT - base {g['SFT - base']:+.2f}; "
                 f"GRPO mean accuracy {acc:.1f}%)",
            detail=f"{detail}; holds = GRPO at least {min_gain:g} points above the base on average; "
                   f"chance {chance:.1f}%"))
    return claims


def plot_generalization(matrices: dict, by: str, path: str | Path | None = None):
    """Med-R1's figure: the SFT and GRPO accuracy matrices and the GRPO - SFT improvement heatmap."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sft_m, grpo_m = (matrices[k].drop(columns="All") for k in ("SFT", "GRPO"))
    diff = grpo_m - sft_m
    n = len(sft_m.columns)
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3 + 1, 0.45 * n + 2.2))
    short = lambda s: s.replace("Other Biological Attributes", "Other Attr.").replace(" Identification", " Id.")  # noqa: E731
    for ax, (title, m, cmap, center) in zip(axes, (("SFT", sft_m, "Blues", None), ("GRPO", grpo_m, "Blues", None),
                                                   ("GRPO - SFT (points)", diff, "RdBu", 0.0))):
        kw = dict(vmin=0, vmax=100) if center is None else dict(center=0.0)
        sns.heatmap(m.rename(index=short, columns=short), annot=True, fmt=".0f", cmap=cmap, cbar=False, ax=ax,
                    annot_kws={"fontsize": 7}, **kw)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"test {by.replace('_', ' ')}")
        ax.set_ylabel(f"train {by.replace('_', ' ')}")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def curves_figure(cfg, by: str, groups):
    """GRPO's training curves of each cell of one protocol (``grpo.plot_curves``)."""
    from .. import grpo

    logs = {f"{by}={g}": zoo.run_dir(cell_name(by, "grpo", g), cfg) / "train" for g in groups}
    return grpo.plot_curves({k: v for k, v in logs.items() if (Path(v) / grpo.LOG_NAME).exists()})


def letter_collapse(results: dict) -> pd.DataFrame:
    """Per protocol, method and training group: the share of the most common answer letter (%) and
    the accuracy (%): a model answering one letter for almost every question has collapsed."""
    return pd.concat({by: r.groupby(["method", "train_group"], sort=False).agg(
        top_letter_share=("pred", lambda s: 100 * s.value_counts(normalize=True, dropna=False).iloc[0]),
        accuracy=("correct", lambda c: 100 * c.mean())) for by, r in results.items()}).round(1)


PAPER_GAIN = {"modality": 29.94, "question_type": 32.06}  # Med-R1's GRPO - base, points


def gains_table(matrices: dict) -> pd.DataFrame:
    """Mean gains (points) of SFT and GRPO over the base and of GRPO over SFT per protocol, beside Med-R1's."""
    rows = []
    for by, m in matrices.items():
        g = generalization_gains(m).round(2)
        g.insert(0, "protocol", f"cross-{by.replace('_', ' ')}")
        g["Med-R1 (GRPO - base)"] = [float("nan"), PAPER_GAIN[by], float("nan")]
        rows.append(g)
    return pd.concat(rows)


def tests_table(results: dict) -> pd.DataFrame:
    """Every cell's paired tests (``generalization_tests``), indexed by protocol, training group and comparison."""
    tests = pd.concat([generalization_tests(r).assign(protocol=by) for by, r in results.items()], ignore_index=True)
    return tests.set_index(["protocol", "train_group", "comparison"]).round(4)
