"""Med-R2's stepwise benchmark (notebook 07): every model through every condition, stepwise vs plain fine-tuning.

    train_cases, test_cases = bench.cases_for(cfg)
    res, timing, skipped = medr2.run(cfg, test_cases)   # one row per (model, condition, case, stage)
"""
from __future__ import annotations

import os
import time

import pandas as pd

from .. import attacks, evaluate, medr2 as bench, runs, sft, zoo
from ..paths import RUNS


def save_cases(cfg, test_cases) -> None:
    """The test cases in the stepwise JSON format (``runs/07_medr2/<profile>/stepwise_test.json``)."""
    bench.save_stepwise(test_cases, RUNS / "07_medr2" / cfg.profile / "stepwise_test.json",
                        os.path.commonpath([c.image_path for c in test_cases]))


def finetune(cfg) -> pd.DataFrame:
    """Stepwise and plain fine-tuning from SFT-nothink for every seed (zoo ``r2-stepwise[-s<k>]``,
    ``r2-plain[-s<k>]``), the plain models in a second process (``medr2.background``); their sizes and times."""
    t0 = time.perf_counter()
    names = zoo.r2_names(cfg)
    zoo.ensure("sft-nothink", cfg)
    plain = [n for n in names if n.startswith("r2-plain")]
    job = zoo.background(plain, cfg) if cfg.medr2.background and plain else None
    for n in names:
        if job is None or n not in plain:
            zoo.ensure(n, cfg)
    if job is not None:
        job.result()
    rows = []
    for n in names:
        run = sft.read_run(zoo.run_dir(n, cfg) / "train")
        rows.append({"model": n, "seed": run["seed"], "items": run["n_train"], "steps": run["steps"],
                     "training seconds": run["seconds"]})
    print(f"this call: {time.perf_counter() - t0:.0f} s")
    return pd.DataFrame(rows).set_index("model")


def models(cfg) -> tuple[list[str], list[str]]:
    """(models to run, models skipped): ``medr2.models`` then the fine-tuned ones; SFT and the
    fine-tuned models train if missing, other names run only when the zoo already has them."""
    names = list(dict.fromkeys([*cfg.medr2.models, *zoo.r2_names(cfg)]))
    keep = [n for n in names if n.startswith(("sft-", "r2-")) or zoo.is_trained(n, cfg)]
    return keep, [n for n in names if n not in keep]


def suite(cfg, name: str, test_cases) -> tuple[pd.DataFrame, str, int]:
    """(``medr2.run_suite``'s results for one model: every cue, PGD with ``medr2.pgd_cues``; the answer
    method; the number of cases), with records in the model's run directory."""
    m = cfg.medr2
    prompt = "think" if name.endswith("-think") else "nothink"
    think = prompt == "think"
    method = "generate" if think or not m.fast_path else "logprob"
    cases = test_cases[:m.n_cases_think if think else m.n_cases]
    kw = dict(cues=m.cues, attack_cues=m.pgd_cues, attack_n_cases=m.n_cases_attack, prompt=prompt,
              image_size=cfg.data.image_size, method=method, batch_size=m.batch_size, max_new_tokens=m.max_new_tokens)
    attack = dict(eps=m.pgd_eps / 255, steps=m.pgd_steps, seed=cfg.seed)
    key = {"model": zoo.key(name, cfg), "cases": runs.fingerprint([c.case_id for c in cases]), **kw,
           "attack": attack if m.pgd_steps else None}
    fresh = {}

    def suite_of(vlm, d):
        hook = (attacks.pgd_perturb(vlm, prompt=prompt, max_new_tokens=m.max_new_tokens, **attack)
                if m.pgd_steps else None)
        return bench.run_suite(vlm, cases, attack=hook, records_dir=d, **kw)

    def run(d):
        vlm = zoo.load(name, cfg)
        fresh["df"] = suite_of(vlm, d)

    df = runs.cached(zoo.run_dir(name, cfg) / "eval-medr2", key, run,
                     load=lambda d, _: fresh["df"] if "df" in fresh else suite_of(evaluate._Recorded(), d))
    return df, method, len(cases)


def run(cfg, test_cases, progress=print) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(every model's results with a ``model`` column, seconds per model, the models skipped). With
    ``medr2.background`` every other model runs in a second process (its records are cached, so this
    process then reads them back; its seconds show as the read-back time)."""
    from ..workbook import background

    names, skipped = models(cfg)
    theirs = names[1::2] if cfg.medr2.background and len(names) > 1 else []
    job = background(_suites_in_worker, cfg.model_dump(), theirs, list(test_cases), threads=cfg.threads) if theirs else None
    frames, timing = {}, {}

    def one(name):
        t0 = time.perf_counter()
        df, method, n = suite(cfg, name, test_cases)
        frames[name] = df.assign(model=name)
        timing[name] = {"model": name, "method": method, "cases": n, "stage items run": len(df),
                        "process": "second" if name in theirs else "this",
                        "seconds": round(time.perf_counter() - t0, 1)}

    for name in names:
        if name not in theirs:
            one(name)
    if job is not None:
        job.result()
    for name in theirs:
        one(name)
    return (pd.concat([frames[n] for n in names], ignore_index=True),
            pd.DataFrame([timing[n] for n in names]).set_index("model"), skipped)


def _suites_in_worker(cfg_dump: dict, names: list[str], test_cases) -> None:
    from ..config import Config

    cfg = Config.model_validate(cfg_dump)
    for n in names:
        suite(cfg, n, test_cases)


def stage_tables(res: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(stage accuracy per model and context, the same in long form, the chain table: chain accuracy,
    accuracy given the previous stage right, and the slope per stage), clean runs only."""
    clean = res[res["cue"] == "clean"]
    chain_runs = clean[clean["context"] == "model"]
    stage_acc = bench.stage_accuracy(clean, by=["model", "context"])
    stage_table = stage_acc.pivot_table(index=["model", "context"], columns="stage",
                                        values="accuracy")[list(bench.STAGES)].round(1)
    chain = bench.chain_accuracy(chain_runs, by="model").set_index("model")
    cond = bench.conditional_accuracy(chain_runs, by="model")
    cond_table = cond.pivot_table(index="model", columns="stage", values="accuracy_given_prev")[list(bench.STAGES[1:])]
    degr = bench.stage_degradation(chain_runs, by="model")
    chain_table = chain.join(cond_table.add_prefix("given previous: ")).join(
        degr.groupby("model")["slope"].first().rename("slope (points per stage)")).round(1)
    return stage_table, stage_acc, chain_table


def stage_figure(cfg, stage_acc: pd.DataFrame):
    """Accuracy at each stage along the workflow: chain, gold context and no context per model."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(9, 3.8))
    styles = {"model": "-", "gold": "--", "none": ":"}
    palette = dict(zip(stage_acc["model"].unique(), sns.color_palette("tab10")))
    for (m, ctx), g in stage_acc.groupby(["model", "context"], sort=False):
        ax.plot(g["k"] + 1, g["accuracy"], styles[ctx], marker="o", color=palette[m],
                label=f"{m} ({ctx} context)" if ctx != "model" else f"{m} (chain)")
    ax.axhline(25, color="grey", lw=0.8, ls="-.", label="chance (4 options)")
    ax.set(xticks=[1, 2, 3, 4], xticklabels=list(bench.STAGES), ylabel="accuracy (%)", ylim=(0, 102),
           title=f"Accuracy along the clinical workflow (profile {cfg.profile})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def flip_tables(res: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(flip rates per stage and cue, pooled over stages): right answers a cue turns wrong (gold context)."""
    gold = res[(res["cue"] == "clean") & (res["context"] == "gold")]
    cued = res[(res["cue"] != "clean") & (res["context"] == "gold")]
    flips = bench.flip_rates(gold, cued, by="model")
    return flips, flips[flips["stage"] == "all"]


def pooled_view(pooled: pd.DataFrame, value: str) -> pd.DataFrame:
    """One pooled flip-rate column (``flip_rate``, ``delta``, ``p_value``, ``follow_rate``) as cue x model."""
    digits = 3 if value == "p_value" else 1
    sub = pooled.dropna(subset=[value]) if value == "follow_rate" else pooled
    return sub.pivot_table(index="cue", columns="model", values=value, sort=False).round(digits)


def flip_figure(cfg, pooled: pd.DataFrame):
    import seaborn as sns

    plot = pooled.assign(kind=pooled["cue"].map(lambda c: bench.CUES[c].kind if c in bench.CUES else "attack"))
    g = sns.catplot(data=plot, x="cue", y="flip_rate", hue="model", kind="bar", height=3.6, aspect=2.4,
                    order=list(dict.fromkeys(plot["cue"])))
    g.set_xticklabels(rotation=30, ha="right")
    g.set(ylabel="flip rate (%)", xlabel="", ylim=(0, 100))
    g.figure.suptitle(f"Right -> wrong under each cue (profile {cfg.profile})", y=1.02)
    return g.figure


FT_COLUMNS = ["chain_accuracy", "chain_stage_acc", "acc_none", "acc_gold", "flip_misleading_text", "flip_context_wrong",
              "flip_misleading_visual", "flip_neutral", "gain_box_true", "gain_hint_right", "flip_pgd", "flip_pgd+box_true"]


def finetune_tables(res: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(chain accuracy per condition, the per-model summary, stepwise vs plain vs SFT-nothink)."""
    chain_cond = bench.chain_accuracy(res[res["context"] != "none"].assign(
        condition=lambda d: d["cue"].where(d["cue"] != "clean", "clean (" + d["context"] + " context)")),
        by=["model", "condition"])
    chain_cond_table = chain_cond.pivot_table(index="condition", columns="model", values="chain_accuracy",
                                              sort=False).round(1)
    summary = bench.summary_table(res).round(1)
    ft = summary.loc[[m for m in summary.index if m == "sft-nothink" or m.startswith("r2-")]]
    return chain_cond_table, summary, ft[[c for c in FT_COLUMNS if c in ft.columns]]


def finetune_figure(cfg, ft: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ft[[c for c in ft.columns if c.startswith("flip_")]].T.plot.bar(ax=ax)
    ax.set(ylabel="flip rate (%)", title=f"Stepwise vs plain fine-tuning: flip rates (profile {cfg.profile})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def case_view(cfg, case):
    """One case as a reader sees it: (its four questions, the stage-4 question under each cue, a
    figure of the image clean and under the two box cues)."""
    import matplotlib.pyplot as plt

    from .. import data

    img = data.load_image(case.image_path, size=cfg.data.image_size)
    questions = pd.DataFrame([{"stage": q.stage, "question": q.question, "options": " | ".join(q.options),
                               "answer": f"{q.answer}) {q.answer_text}"} for q in case.stages])
    si = bench.stage_item(case, 3, "gold")
    shown = {"clean (gold context)": bench.question_text(si)}
    for name in cfg.medr2.cues:
        if bench.CUES[name].applies(si):
            shown[name] = bench.question_text(bench.CUES[name](si, img)[0])
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    for ax, (title, x) in zip(axes, [("clean", img), ("box_true", bench.box_true(si, img)[1]),
                                     ("box_wrong", bench.box_wrong(si, img)[1])]):
        ax.imshow(x.permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{case.case_id}: visual cues")
    fig.tight_layout()
    return questions, pd.Series(shown, name="stage 4 question as the model reads it").to_frame(), fig


def case_counts(train_cases, test_cases) -> pd.DataFrame:
    """Train and test cases per modality (and all)."""
    from collections import Counter

    from .. import data

    counts = pd.DataFrame({"train cases": Counter(c.modality for c in train_cases),
                           "test cases": Counter(c.modality for c in test_cases)}
                          ).reindex(data.MODALITIES).fillna(0).astype(int)
    counts.loc["All"] = counts.sum()
    return counts.T
