"""SafeMed-R1's collapse of the fine-tuned baselines under PGD (notebook 03): clean vs attacked, an eps sweep.

    results, sweep = collapse.run(cfg)       # per-item rows: the headline attack, and every radius
    collapse.clean_vs_pgd(cfg, results, "modality")
"""
from __future__ import annotations

import random

import pandas as pd

from .. import baselines, benchmark, dataset, evaluate, report, runs, zoo


def items(cfg) -> tuple[list, list]:
    """(attacked questions, the first ``attack.n_sweep`` of them for the sweep): a seeded sample of the test split."""
    _, test = dataset.splits(cfg)
    picked = random.Random(cfg.seed).sample(test, min(cfg.attack.n_items, len(test)))
    return picked, picked[:cfg.attack.n_sweep]


def grid(cfg) -> tuple[list[dict], str]:
    """(the sweep's attack settings, the headline attack's name): L-inf radii and the headline radius
    in 1/255, L2 radii, ``attack.steps`` PGD steps each (``benchmark.attack_grid``)."""
    a = cfg.attack
    g = benchmark.attack_grid(linf_eps=sorted({*a.linf_eps, a.eps}), l2_eps=a.l2_eps, steps=a.steps)
    return g, f"linf_{a.eps:g}"


def model_results(cfg, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(headline results, sweep results) of one model: ``benchmark.evaluate_attacks`` with records in
    the model's run directory (``eval-attacks``), done once per model and settings."""
    a, variant = cfg.attack, name.rsplit("-", 1)[1]
    main_items, sweep_items = items(cfg)
    full, main = grid(cfg)
    kw = dict(prompt=variant, image_size=cfg.data.image_size, tag=name, batch_size=a.batch_size,
              max_new_tokens=a.max_new_tokens, seed=cfg.seed, restarts=a.restarts)
    key = {"model": zoo.key(name, cfg), "items": runs.ids_digest(main_items), "sweep": runs.ids_digest(sweep_items),
           "grid": full, **kw}
    fresh = {}

    def both(vlm, d):
        return (benchmark.evaluate_attacks(vlm, main_items, grid=[g for g in full if g["name"] == main],
                                           records_dir=d, **kw),
                benchmark.evaluate_attacks(vlm, sweep_items, grid=full, records_dir=d, **kw))

    def run(d):
        fresh["out"] = both(zoo.load(name, cfg), d)

    return runs.cached(zoo.run_dir(name, cfg) / "eval-attacks", key, run,
                       load=lambda d, _: fresh.get("out") or both(evaluate._Recorded(), d))


def run(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Headline and sweep results of every model in ``attack.models`` (one long table each)."""
    frames = [model_results(cfg, name) for name in cfg.attack.models]
    return (pd.concat([f[0] for f in frames], ignore_index=True), pd.concat([f[1] for f in frames], ignore_index=True))


def clean_vs_pgd(cfg, results: pd.DataFrame, by: str) -> pd.DataFrame:
    """Accuracy (%) per group of ``by``: clean and under the headline attack, per model, and n."""
    _, main = grid(cfg)
    parts = {}
    for name in cfg.attack.models:
        for label, attack in (("clean", "clean"), (f"PGD {cfg.attack.eps:g}/255", main)):
            sub = results[(results["model"] == name) & (results["attack"] == attack)]
            parts[f"{name} {label}"] = evaluate.accuracy_table(sub, by=by)["accuracy"]
    n = evaluate.accuracy_table(results[results["attack"] == "clean"].drop_duplicates("question_id"), by=by)["n"]
    table = pd.DataFrame(parts).round(1)
    table["n"] = n
    return table


def sweep_figure(cfg, sweep: pd.DataFrame, n_items: int, chance: float):
    """Accuracy against the L-inf and L2 radius per model (dashed: clean, dash-dot: chance; the
    paper's 95% clean and 25% under PGD dotted)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    clean = sweep[sweep["norm"] == "none"].set_index("model")["accuracy"]
    for ax, norm, scale, xlabel in ((axes[0], "linf", 255, "L-inf eps (x 1/255)"), (axes[1], "l2", 1, "L2 radius")):
        sub = sweep[sweep["norm"] == norm].assign(x=lambda d: d["eps"] * scale)
        sns.lineplot(data=sub, x="x", y="accuracy", hue="model", marker="o", ax=ax)
        for i, (name, acc) in enumerate(clean.items()):
            ax.axhline(acc, color=f"C{i}", ls="--", lw=1)
        ax.axhline(chance, color="black", ls="-.", lw=0.8)
        ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(0, 100), title=f"PGD {norm} ({cfg.attack.steps} steps)")
        if norm == "linf":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(sub["x"].unique()), [f"{x:g}" for x in sorted(sub["x"].unique())])
            ax.minorticks_off()
    axes[0].axhline(95, color="grey", ls=":", lw=1)
    axes[0].axhline(25, color="grey", ls=":", lw=1)
    axes[0].text(0.02, 27, "paper (eps not published): 95% clean, 25% under PGD", color="grey", fontsize=8,
                 transform=axes[0].get_yaxis_transform())
    fig.suptitle(f"SFT baselines under PGD (dashed: clean accuracy, dash-dot: chance; profile {cfg.profile}, "
                 f"{n_items} items)")
    fig.tight_layout()
    return fig


def claim(cfg, results: pd.DataFrame, attacked_items: list) -> dict:
    """SafeMed-R1's collapse, judged on the models more than 10 points above chance: PGD accuracy at
    most half the clean accuracy for each of them (``report.record_claim`` arguments)."""
    _, main = grid(cfg)
    a = cfg.attack
    def acc(name, attack):
        return results[(results["model"] == name) & (results["attack"] == attack)]["correct"].mean() * 100

    by_model = {name: (acc(name, "clean"), acc(name, main)) for name in a.models}
    ours = "; ".join(f"{name}: {c:.1f}% clean -> {x:.1f}% under PGD {a.eps:g}/255" for name, (c, x) in by_model.items())
    chance = 100 * baselines.chance_level(attacked_items)
    judged = {n: (c, x) for n, (c, x) in by_model.items() if report.reads_image(c, chance)}
    holds = all(x <= c / 2 for c, x in judged.values()) if judged else None
    return dict(claim_id="safemed.sft_collapse", ours=ours, holds=holds,
                detail=f"{len(attacked_items)} test items, L-inf {a.eps:g}/255, step {a.eps / 4:g}/255, "
                       f"{a.steps} steps, 8-bit rounded, greedy generation; judged on the models more than 10 points "
                       f"above chance ({chance:.1f}%): {sorted(judged) or 'none'}")
