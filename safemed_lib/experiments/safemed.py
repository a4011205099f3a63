"""SafeMed-R1's robustness table (notebook 05): SFT, GRPO, AT-GRPO and AT-SFT, clean and under PGD.

    runs = safemed.train(cfg)                  # {"SFT-think": ("think", "sft-think"), ...}
    per_model = safemed.evaluate_all(cfg, runs)  # {label: (clean results, PGD results)}
    suite = safemed.attack_suite(cfg, runs)    # other objectives, a strong attack, eps curves (long rows)
"""
from __future__ import annotations

import time
from typing import Sequence

import pandas as pd

from .. import attacks, benchmark, dataset, evaluate, grpo, report, zoo
from ..workbook import background

LABELS = {"sft": "SFT", "grpo": "GRPO", "atgrpo": "AT-GRPO", "sftat": "AT-SFT"}


def modes(cfg) -> list[str]:
    """The prompt forms of the table (think needs the embedded benchmark's rationales)."""
    return [m for m in cfg.safemed.modes if m == "nothink" or cfg.data.omnimedvqa_root is None]


def train(cfg, progress=print) -> dict[str, tuple[str, str]]:
    """Train (or find) every model of the table through the zoo; returns ``{label: (mode, zoo name)}``
    in table order (per mode SFT, GRPO, AT-GRPO; then AT-SFT). AT-SFT trains in its own process
    while GRPO trains here when ``safemed.at_sft.background``."""
    out, jobs = {}, {}
    for mode in modes(cfg):
        zoo.ensure(f"sft-{mode}", cfg)
        out[f"SFT-{mode}"] = (mode, f"sft-{mode}")
        if mode in cfg.safemed.at_sft.modes:  # first, so that it trains in the background during GRPO
            name = f"sftat-{mode}"
            jobs[f"AT-SFT-{mode}"] = (mode, name, background(zoo.ensure, name, cfg, threads=cfg.threads)
                                      if cfg.safemed.at_sft.background else zoo.ensure(name, cfg))
        for kind in ("grpo", "atgrpo"):
            t0 = time.perf_counter()
            zoo.ensure(f"{kind}-{mode}", cfg)
            out[f"{LABELS[kind]}-{mode}"] = (mode, f"{kind}-{mode}")
            if progress:
                progress(f"{LABELS[kind]}-{mode}: ready in {time.perf_counter() - t0:.0f} s")
    for label, (mode, name, job) in jobs.items():
        if cfg.safemed.at_sft.background:
            job.result()  # waits for the background run (re-raises its error)
        out[label] = (mode, name)
    return out


def logs(cfg, runs: dict) -> dict[str, pd.DataFrame]:
    """GRPO's training logs (one row per step) of the GRPO and AT-GRPO models."""
    return {label: grpo.read_log(zoo.run_dir(name, cfg) / "train") for label, (_, name) in runs.items()
            if "GRPO" in label}


def steps_table(logs: dict) -> pd.DataFrame:
    """Per GRPO run: steps, mean step time, final rewards (clean and under attack) and the attack's success."""
    return pd.DataFrame({label: {"steps": len(df), "mean step s": df["step_time"].mean(),
                                 "final reward (last 10)": df["reward"].tail(10).mean(),
                                 "adv reward (last 10)": df["reward_adv"].tail(10).mean() if "reward_adv" in df else None,
                                 "attack success (mean)": df["adv_success_rate"].mean() if "adv_success_rate" in df else None}
                         for label, df in logs.items()}).T


def eval_items(cfg) -> list:
    _, test = dataset.splits(cfg)
    return evaluate.subset(test, cfg.safemed.eval.n, seed=cfg.seed)


def evaluate_model(cfg, name: str, mode: str, items: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clean and PGD (``safemed.eval``: L-inf radius and step in 1/255, steps, 8-bit rounded; the attack
    ascends the NLL of the reference answer, after the model's own clean reasoning for think
    prompts: ``attacks.pgd_perturb``) results of one model, with records in its run directory."""
    e = cfg.safemed.eval
    eps, alpha, max_len = e.eps / 255, e.alpha / 255, getattr(cfg.safemed.grpo, mode).max_completion_length
    cache = {}

    def model():
        if "vlm" not in cache:
            cache["vlm"] = zoo.load(name, cfg)
        return cache["vlm"]

    ev = dict(prompt=mode, image_size=cfg.data.image_size, batch_size=e.batch_size, max_new_tokens=max_len)
    key, run_dir = zoo.key(name, cfg), zoo.run_dir(name, cfg)
    clean = evaluate.cached(model, items, run_dir / "eval-robust-clean", model_key=key, **ev)
    outputs = dict(zip(clean["question_id"], clean["output"]))  # think targets: the clean reasoning

    def perturb(images, batch):  # built per batch, so a fully recorded run never loads the model
        return attacks.pgd_perturb(model(), prompt=mode, eps=eps, alpha=alpha, steps=e.steps, seed=cfg.seed,
                                   clean_outputs=outputs, max_new_tokens=max_len)(images, batch)

    pgd = evaluate.cached(model, items, run_dir / "eval-robust-pgd", model_key=key, perturb=perturb,
                          extra_key={"attack": "pgd", "eps": eps, "alpha": alpha, "steps": e.steps, "seed": cfg.seed},
                          **ev)
    return clean, pgd


def evaluate_all(cfg, runs: dict, progress=print) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """``{label: (clean results, PGD results)}`` of every model of the table on the same questions."""
    items, out = eval_items(cfg), {}
    for label, (mode, name) in runs.items():
        t0 = time.perf_counter()
        out[label] = clean, pgd = evaluate_model(cfg, name, mode, items)
        if progress:
            progress(f"{label}: clean {100 * clean.correct.mean():.1f}%, PGD {100 * pgd.correct.mean():.1f}% "
                     f"({time.perf_counter() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------- the attack suite
SUITE_NAMES = {"first_token": "first token (fork)", "margin": "margin (CW)"}


def _pgd_and_strong(cfg) -> tuple[str, str]:
    """The grid names of the table's PGD and of the strong attack (``benchmark.attack_grid``'s names)."""
    e = cfg.safemed.eval
    return f"linf_{e.eps:g}", f"linf_{e.eps:g}_x{e.strong_restarts}"


def suite_grid(cfg, mode: str) -> list[dict]:
    """The suite's attacks for a ``mode`` model (``benchmark.attack_grid`` entries): PGD-``steps`` at
    ``eps`` (the table's attack, name ``linf_<eps>``), the same radius with the first generated
    token's cross-entropy (the objective of SafeMed-R1's public fork, its step and steps, no random
    start, bounded in pixel space: ``first_token``), with the option-letter margin for answer-first
    prompts (``margin``), PGD-``strong_steps`` with ``strong_restarts`` random starts
    (``linf_<eps>_x<restarts>``), then the eps curve's other radii."""
    e = cfg.safemed.eval
    grid = benchmark.attack_grid((e.eps,), (), e.steps)
    grid[0]["alpha"] = e.alpha / 255
    grid.append(benchmark.fork_attack(eps=e.eps / 255, name="first_token"))
    if mode in attacks.ANSWER_FIRST:
        grid += [dict(g, name="margin") for g in benchmark.attack_grid((e.eps,), (), e.steps, target="margin")]
    grid += benchmark.attack_grid((e.eps,), (), e.strong_steps, restarts=e.strong_restarts,
                                  suffix=f"_x{e.strong_restarts}")
    return grid + benchmark.attack_grid([x for x in e.linf_curve if x != e.eps], e.l2_curve, e.steps)


def attack_suite(cfg, runs: dict, progress=print) -> pd.DataFrame:
    """Every model of ``runs`` under :func:`suite_grid` on the first ``safemed.eval.suite_n`` questions
    of the table (``benchmark.evaluate_attacks``, records in each model's run directory): long rows
    ``model`` (the table's label), ``attack``, ``norm``, ``eps``, ``question_id``, ``correct``, ...
    Empty when ``suite_n`` is 0."""
    e = cfg.safemed.eval
    items = eval_items(cfg)[:e.suite_n]
    frames = []
    for label, (mode, name) in runs.items() if items else ():
        t0 = time.perf_counter()
        frames.append(benchmark.evaluate_attacks(
            zoo.Lazy(name, cfg), items, prompt=mode, image_size=cfg.data.image_size, grid=suite_grid(cfg, mode),
            records_dir=zoo.run_dir(name, cfg) / "eval-robust-suite", tag=zoo.fingerprint(name, cfg),
            batch_size=e.batch_size, max_new_tokens=getattr(cfg.safemed.grpo, mode).max_completion_length,
            seed=cfg.seed).assign(model=label))
        if progress:
            progress(f"{label}: attack suite on {len(items)} questions ({time.perf_counter() - t0:.0f} s)")
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _at_radius(cfg, suite: pd.DataFrame) -> list[str]:
    pgd, strong = _pgd_and_strong(cfg)
    return [a for a in (pgd, "first_token", "margin", strong) if a in set(suite["attack"])]


def suite_table(cfg, suite: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per model under each attack at the table's radius and under the strongest per
    question (``benchmark.strongest``: right under all of them, and clean); models as rows."""
    e = cfg.safemed.eval
    if suite.empty:
        return pd.DataFrame()
    rows = []
    for model, d in suite.groupby("model", sort=False):
        names = [a for a in _at_radius(cfg, suite) if a in set(d["attack"])]
        rows.append(benchmark.strongest(d, names).assign(model=model))
    pgd, strong = _pgd_and_strong(cfg)
    labels = {pgd: f"PGD-{e.steps}", strong: f"PGD-{e.strong_steps} x{e.strong_restarts}", **SUITE_NAMES}
    table = pd.concat(rows).assign(attack=lambda d: d["attack"].replace(labels))
    out = table.pivot(index="model", columns="attack", values="accuracy")
    order = ["clean", *[labels[a] for a in _at_radius(cfg, suite)], "worst case"]
    out = out[[c for c in order if c in out]].reindex(suite["model"].unique())
    return out.round(1).assign(n=table.groupby("model")["n"].first())


def curve_attacks(cfg, suite: pd.DataFrame) -> list[str]:
    """The suite's eps-curve attacks: one per radius (the standard PGD; not the other objectives)."""
    other = {"first_token", "margin", _pgd_and_strong(cfg)[1]}
    return [a for a in suite["attack"].unique() if a != "clean" and a not in other]


def masking_table(cfg, suite: pd.DataFrame, chance: float) -> pd.DataFrame:
    """Carlini et al.'s gradient-masking checks per model (``benchmark.masking_checks``): accuracy never
    rises with eps, reaches about ``chance`` (a fraction) at 64/255, and the strong attack never gets
    right a question PGD-``steps`` gets wrong."""
    if suite.empty:
        return pd.DataFrame(columns=["model", "check", "compared", "value", "limit", "n", "passed"])
    return benchmark.masking_checks(suite, chance=chance, pairs=[_pgd_and_strong(cfg)], sweep_attacks=curve_attacks(cfg, suite),
                                    large_eps=64 / 255)


def curves_figure(cfg, suite: pd.DataFrame):
    """Accuracy against the radius per model, L-inf and L2 side by side (clean at 0)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    if suite.empty:
        fig.suptitle("no attack suite (safemed.eval.suite_n = 0)")
        return fig
    table = benchmark.sweep_table(suite[suite["attack"].isin(["clean", *curve_attacks(cfg, suite)])])
    for ax, norm, unit in ((axes[0], "linf", 255), (axes[1], "l2", 1)):
        for model in suite["model"].unique():
            d = table[(table["model"] == model) & table["norm"].isin(["none", norm])]
            ax.plot(d["eps"] * unit, d["accuracy"], marker="o", ms=3, label=model)
        ticks = sorted(set(table.loc[table["norm"].isin(["none", norm]), "eps"] * unit))
        if norm == "linf":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("L-inf radius (x/255)" if norm == "linf" else "L2 radius ([0, 1] pixels)")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    n = suite["question_id"].nunique()
    fig.suptitle(f"accuracy against the attack's radius (PGD-{cfg.safemed.eval.steps}, {n} questions)")
    fig.tight_layout()
    return fig


def modality_table(per_model: dict) -> pd.DataFrame:
    """Clean and PGD accuracy (%) per modality and model, with the question count."""
    table = pd.concat({(label, kind): evaluate.accuracy_table(df, "modality")["accuracy"]
                       for label, (clean, pgd) in per_model.items() for kind, df in (("clean", clean), ("PGD", pgd))},
                      axis=1).round(1)
    table[("", "n")] = evaluate.accuracy_table(next(iter(per_model.values()))[0], "modality")["n"]
    return table


def overall_table(per_model: dict) -> pd.DataFrame:
    """Per model: clean and PGD accuracy and invalid-answer rates (%)."""
    return pd.DataFrame({label: {"clean": 100 * c.correct.mean(), "PGD": 100 * p.correct.mean(),
                                 "clean invalid %": 100 * c.pred.isna().mean(), "PGD invalid %": 100 * p.pred.isna().mean()}
                         for label, (c, p) in per_model.items()}).T.round(1)


def targets_table(cfg, overall: pd.DataFrame) -> pd.DataFrame:
    """SafeMed-R1's targets for AT-GRPO against SFT and against GRPO, and for AT-SFT against SFT."""
    ms = modes(cfg)
    return pd.concat([robustness_summary(overall, baseline=f"SFT-{m}", robust=f"AT-GRPO-{m}") for m in ms]
                     + [robustness_summary(overall, baseline=f"GRPO-{m}", robust=f"AT-GRPO-{m}") for m in ms]
                     + [robustness_summary(overall, baseline=f"SFT-{m}", robust=f"AT-SFT-{m}")
                        for m in ms if f"AT-SFT-{m}" in overall.index], ignore_index=True).round(2)


def paired_table(per_model: dict, targets: pd.DataFrame) -> pd.DataFrame:
    """Paired tests (``evaluate.paired_test``) of each robust model against its baseline, clean and under PGD."""
    paired = pd.DataFrame([{"baseline": b, "robust": r, "images": kind,
                            **evaluate.paired_test(per_model[b][i], per_model[r][i])}
                           for b, r in zip(targets["baseline"], targets["robust"])
                           for i, kind in enumerate(("clean", "PGD"))])
    return paired.round({c: 1 for c in ("acc_a", "acc_b", "diff", "ci_low", "ci_high")}).round({"p_value": 4})


def cot_table(per_model: dict) -> pd.DataFrame:
    """Chain of thought against answer-only: per method with both forms, the paired test
    (``evaluate.paired_test``) of <method>-think (b) against <method>-nothink (a), clean and under
    PGD, on the same questions; the clean row shows how far the two are from matched accuracy."""
    methods = [k for k in ("SFT", "GRPO", "AT-GRPO", "AT-SFT") if {f"{k}-think", f"{k}-nothink"} <= set(per_model)]
    rows = [{"method": k, "images": kind, **evaluate.paired_test(per_model[f"{k}-nothink"][i], per_model[f"{k}-think"][i])}
            for k in methods for i, kind in enumerate(("clean", "PGD"))]
    table = pd.DataFrame(rows).rename(columns={"acc_a": "nothink", "acc_b": "think", "a_only": "nothink_only",
                                               "b_only": "think_only"})
    return table.round({c: 1 for c in ("nothink", "think", "diff", "ci_low", "ci_high")}).round({"p_value": 4})


def diagnostics(per_model: dict) -> pd.DataFrame:
    """Per model: the most common letter's share (clean), answers changed by PGD, the attack's mean loss gain."""
    return pd.DataFrame({label: {
        "top letter share % (clean)": 100 * c["pred"].value_counts(normalize=True, dropna=False).iloc[0],
        "answers changed by PGD %": 100 * (c["pred"].fillna("-").values != p["pred"].fillna("-").values).mean(),
        "mean attack loss gain": (p["attack_loss_adv"] - p["attack_loss_clean"]).mean()}
        for label, (c, p) in per_model.items()}).T.round(2)


def clean_vs_pgd_figure(cfg, overall: pd.DataFrame, n: int):
    """Clean and PGD accuracy per model beside SafeMed-R1's reported 84.45% under PGD."""
    import matplotlib.pyplot as plt

    ax = overall[["clean", "PGD"]].plot.bar(figsize=(8, 3.2), rot=20, color=["#4c72b0", "#c44e52"])
    ax.axhline(84.45, ls=":", color="k", lw=1)
    ax.text(-0.4, 86, "SafeMed-R1 PGD 84.45%", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"clean vs PGD {cfg.safemed.eval.eps:g}/255 ({n} questions)")
    plt.tight_layout()
    return ax.figure


def robustness_summary(table, *, baseline: str, robust: str, max_clean_drop: float = 10.0, min_ratio: float = 2.0):
    """SafeMed-R1's targets from an "All" row of clean / PGD accuracies (%): ``robust``'s PGD
    accuracy at least ``min_ratio`` x ``baseline``'s, with at most ``max_clean_drop`` points of
    clean accuracy lost. ``table``: DataFrame indexed by model name with columns "clean", "PGD".
    Returns a one-row DataFrame with the measured numbers and whether each target is met."""
    b, r = table.loc[baseline], table.loc[robust]
    ratio = r["PGD"] / b["PGD"] if b["PGD"] > 0 else float("inf") if r["PGD"] > 0 else float("nan")
    drop = b["clean"] - r["clean"]
    return pd.DataFrame([{
        "baseline": baseline, "robust": robust, "baseline clean": b["clean"], "baseline PGD": b["PGD"],
        "robust clean": r["clean"], "robust PGD": r["PGD"], "PGD ratio": ratio,
        f"PGD ratio >= {min_ratio:g}": bool(ratio >= min_ratio), "clean drop (points)": drop,
        f"clean drop <= {max_clean_drop:g}": bool(drop <= max_clean_drop)}])


def robustness_claims(overall, modes: Sequence[str], chance: float, *, detail: str = "") -> list[dict]:
    """SafeMed-R1's two robustness claims tested on notebook 05's "All" table, as keyword
    arguments for ``report.record_claim`` (claim_id, ours, holds, detail).

    ``overall``: DataFrame indexed by model name ("SFT-think", "AT-GRPO-nothink", ...) with "clean"
    and "PGD" accuracies (%); ``chance``: the chance accuracy (%); ``detail``: the attack, appended
    to each claim's detail. A model within 10 points of chance does not read the image, so a
    comparison involving one says nothing: its verdict is None ("cannot tell").
    - *AT-GRPO robust*: every AT-GRPO-<mode> is at least 10 points above SFT-<mode> under PGD;
    - *chain of thought more robust*: for SFT and for AT-GRPO, think beats nothink under PGD.
    """
    def informative(*names):
        return all(report.reads_image(overall.loc[n, "clean"], chance) for n in names)

    at = [m for m in modes if f"AT-GRPO-{m}" in overall.index and f"SFT-{m}" in overall.index]
    ours = "; ".join(f"AT-GRPO-{m} {overall.loc[f'AT-GRPO-{m}', 'clean']:.1f}% clean / "
                     f"{overall.loc[f'AT-GRPO-{m}', 'PGD']:.1f}% PGD vs SFT-{m} {overall.loc[f'SFT-{m}', 'clean']:.1f}% / "
                     f"{overall.loc[f'SFT-{m}', 'PGD']:.1f}%" for m in at)
    holds = (all(overall.loc[f"AT-GRPO-{m}", "PGD"] >= overall.loc[f"SFT-{m}", "PGD"] + report.MATERIAL_GAIN for m in at)
             if at and all(informative(f"AT-GRPO-{m}", f"SFT-{m}") for m in at) else None)
    claims = [dict(claim_id="safemed.atgrpo_robust", ours=ours, holds=holds,
                   detail=f"{detail}; holds = AT-GRPO at least {report.MATERIAL_GAIN:g} points above SFT under PGD; "
                          f"chance {chance:.1f}%")]
    pairs = [(f"{k}-think", f"{k}-nothink") for k in ("SFT", "AT-GRPO")
             if f"{k}-think" in overall.index and f"{k}-nothink" in overall.index]
    ours = "; ".join(f"{t.rsplit('-', 1)[0]}: think {overall.loc[t, 'PGD']:.1f}% vs nothink "
                     f"{overall.loc[n, 'PGD']:.1f}% under PGD" for t, n in pairs)
    holds = (all(overall.loc[t, "PGD"] > overall.loc[n, "PGD"] for t, n in pairs)
             if pairs and all(informative(t, n) for t, n in pairs) else None)
    claims.append(dict(claim_id="safemed.cot_more_robust", ours=ours or "no think/nothink pair on this profile",
                       holds=holds, detail=f"PGD accuracy, same attack; chance {chance:.1f}%"))
    return claims
