"""Randomized smoothing of the VLMs' answers (notebook 06): CERTIFY per model, sigma and question, certified accuracy.

    smoothing.estimate(cfg)             # samples and hours per model at a measured rate, before running
    certs = smoothing.run(cfg)          # one row per (model, sigma, question)
    smoothing.summary(cfg, certs)       # certified accuracy (%) at the profile's radii
    smoothing.soundness_table(smoothing.attacks(cfg, certs))  # SmoothAdv against the certificates
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import certify, data, dataset, evaluate, runs, zoo
from .. import smoothing as sm


def settings_table(cfg) -> pd.DataFrame:
    """The sample sizes of this profile beside Cohen et al.'s, and the largest radius each can certify."""
    c = cfg.certify
    t = pd.DataFrame(
        [{"setting": "reference (Cohen et al.)", "n0": 100, "n": 100_000, "alpha": 0.001},
         {"setting": f"profile {cfg.profile}: answer-only (fast path)", "n0": c.n0, "n": c.n, "alpha": c.alpha,
          "items": c.n_items},
         {"setting": f"profile {cfg.profile}: think (generation)", "n0": c.n0, "n": c.n_think, "alpha": c.alpha,
          "items": c.n_items_think}])
    for s in c.sigmas:
        t[f"max radius, sigma={s}"] = [sm.max_certifiable_radius(s, int(n), a) for n, a in zip(t["n"], t["alpha"])]
    return t


def _plan(cfg, name: str) -> dict:
    """How model ``name`` is certified: its prompt, base classifier, items and samples per certificate."""
    c = cfg.certify
    think = name.endswith("-think")
    method = "generate" if think or not c.fast_path else "logprob"
    return dict(prompt="think" if think else "nothink", method=method,
                items=c.n_items_think if think else c.n_items, n=c.n_think if think else c.n)


def measure_rate(cfg, name: str) -> float:
    """Noisy samples per second of model ``name``'s certification, noise included: one timed batch
    of ``certify.batch_size`` samples of a test image (after an untimed warm-up), drawn as
    ``certify_items`` draws them (``certify.noise``)."""
    import torch

    plan, c = _plan(cfg, name), cfg.certify
    _, test = dataset.splits(cfg)
    item = certify.pick_items(test, 1)[0]
    vlm = zoo.load(name, cfg)
    x = data.load_images([item], size=cfg.data.image_size)[0].to(vlm.device)
    sampler = certify.sampler(vlm, item, method=plan["method"], prompt=plan["prompt"], noise=c.noise,
                              max_new_tokens=c.max_new_tokens, image_size=cfg.data.image_size)
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)  # the global RNG stays untouched
    kw = dict(sigma=c.sigmas[0], batch_size=c.batch_size, num_classes=len(item.options) + 1, generator=gen)
    sampler(x, 2, **kw)
    t0 = time.perf_counter()
    sampler(x, c.batch_size, **kw)
    return c.batch_size / (time.perf_counter() - t0)


def cost(cfg, rates: dict[str, float] | None = None) -> pd.DataFrame:
    """What CERTIFY costs on this profile, per model: items x sigmas certificates of n0 + n noisy
    samples each (a teacher-forced pass each on the fast path, a generation each otherwise); with
    ``rates`` ({model: samples per second}, :func:`measure_rate`) the hours they take at that rate."""
    c, rows = cfg.certify, []
    for name in c.models:
        plan = _plan(cfg, name)
        samples = plan["items"] * len(c.sigmas) * (c.n0 + plan["n"])
        row = {"model": name, "classifier": plan["method"], "items": plan["items"], "sigmas": len(c.sigmas),
               "samples per certificate": c.n0 + plan["n"], "samples": samples}
        if rates and name in rates:
            row.update({"samples/s": round(rates[name], 1), "hours": round(samples / rates[name] / 3600, 2)})
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def estimate(cfg) -> pd.DataFrame:
    """:func:`cost` with the rate of each model measured here that is trained already (the others
    train during :func:`run`, in its two processes)."""
    names, _ = available(cfg, cfg.certify.models)
    return cost(cfg, {n: measure_rate(cfg, n) for n in names if zoo.is_trained(n, cfg)})


def available(cfg, names) -> tuple[list[str], list[str]]:
    """(models to certify, models skipped): SFT and noise-trained SFT models train if missing; other
    names are certified only when the zoo already has them (e.g. after notebook 05)."""
    keep = [n for n in names if n.startswith(("sft-", "sftnoise-")) or zoo.is_trained(n, cfg)]
    return keep, [n for n in names if n not in keep]


def certify_model(cfg, name: str) -> pd.DataFrame:
    """CERTIFY on every sigma for one model (records in its run directory, one run per sigma)."""
    c, plan = cfg.certify, _plan(cfg, name)
    variant, method = plan["prompt"], plan["method"]
    _, test = dataset.splits(cfg)
    items = certify.pick_items(test, plan["items"])
    if not items:
        return pd.DataFrame()
    key, cache = zoo.key(name, cfg), {}

    def model():
        if "vlm" not in cache:
            cache["vlm"] = zoo.load(name, cfg)
        return cache["vlm"]

    frames = []
    for sigma in c.sigmas:
        kw = dict(sigma=sigma, n0=c.n0, n=plan["n"], alpha=c.alpha, method=method, prompt=variant,
                  image_size=cfg.data.image_size, batch_size=c.batch_size, seed=cfg.seed,
                  max_new_tokens=c.max_new_tokens, model_id=zoo.fingerprint(name, cfg), noise=c.noise,
                  desc=f"{name} sigma={sigma}")
        run_key = {"model": key, "items": runs.ids_digest(items), **{k: v for k, v in kw.items() if k != "desc"}}
        fresh = {}

        def run(d, kw=kw, fresh=fresh):
            fresh["df"] = certify.certify_items(model(), items, records_path=d / "records.jsonl", **kw)

        # one folder per sample size: profiles sharing a model folder (tiny, tiny_eval) keep each other's runs
        folder = f"eval-certify-sigma{sigma}-n{plan['n']}-items{len(items)}"
        df = runs.cached(zoo.run_dir(name, cfg) / folder, run_key, run,
                         load=lambda d, _, kw=kw, fresh=fresh: fresh.get("df") if "df" in fresh else
                         certify.certify_items(evaluate._Recorded(), items, records_path=d / "records.jsonl", **kw))
        frames.append(df.assign(model=name))
    return pd.concat(frames, ignore_index=True)


def attack_model(cfg, name: str, certs: pd.DataFrame) -> pd.DataFrame:
    """SmoothAdv (``smoothing.smooth_adv``) at each ``certify.attack.radii`` on the first ``attack.items``
    questions of model ``name``'s certification at ``attack.sigma``, then PREDICT at the attacked image
    (noise as in CERTIFY). One row per (question, radius): ``certified`` (right with radius >= r),
    ``pred_adv``, ``correct_adv``, ``abstain_adv``, ``violation`` (certified, and PREDICT gives another
    class), ``top_adv_right`` (the most frequent class of PREDICT's samples is right). Answer-only models on the fast path only (the attack needs gradients); cached in the model's
    run directory."""
    import torch

    from ..models import option_scorer

    a, c = cfg.certify.attack, cfg.certify
    plan = _plan(cfg, name)
    mine = certs[(certs["model"] == name) & (certs["sigma"] == a.sigma)].head(a.items)
    if plan["method"] != "logprob" or mine.empty or not a.items:
        return pd.DataFrame()
    _, test = dataset.splits(cfg)
    by_id = {it.question_id: it for it in test}
    key = {"model": zoo.key(name, cfg), "attack": a.model_dump(), "alpha": c.alpha, "noise": c.noise, "seed": cfg.seed,
           "items": runs.ids_digest([by_id[q] for q in mine["question_id"]])}

    def run_(d):
        vlm = zoo.load(name, cfg)
        if not option_scorer.supported(vlm):
            return []
        rows = []
        for row in mine.itertuples():
            it = by_id[row.question_id]
            x = data.load_images([it], size=cfg.data.image_size)[0].to(vlm.device)
            scorer = option_scorer.OptionScorer(vlm, it, plan["prompt"], tuple(x.shape[-2:]))
            sample = scorer.counts if c.noise == "embedding" else certify.sampler(
                vlm, it, method="logprob", prompt=plan["prompt"], noise="pixel")
            for r in a.radii:
                gen = certify.item_generator(cfg.seed + 1, f"{it.question_id}/{r}", x.device)
                x_adv = sm.smooth_adv(scorer.logprobs, x, int(row.label), sigma=a.sigma, radius=r, steps=a.steps,
                                      m=a.m, generator=gen)
                counts = sample(x_adv, a.n, sigma=a.sigma, batch_size=c.batch_size,
                                num_classes=len(it.options) + 1, generator=gen)
                pred, top = sm.predict_from_counts(counts, c.alpha), int(counts.argmax())
                certified = bool(row.correct and row.radius >= r)
                rows.append({"question_id": it.question_id, "radius": r, "l2": float((x_adv - x).norm()),
                             "certified": certified, "pred_adv": pred, "correct_adv": pred == int(row.label),
                             "top_adv_right": top == int(row.label), "abstain_adv": pred == sm.ABSTAIN,
                             "counts_adv": counts.tolist(),
                             "violation": certified and pred not in (int(row.label), sm.ABSTAIN)})
        return rows

    rows = runs.cached(zoo.run_dir(name, cfg) / f"eval-smoothadv-sigma{a.sigma}", key, run_)
    return pd.DataFrame(rows).assign(model=name, sigma=a.sigma)


def stages_table(cfg, certs: pd.DataFrame) -> pd.DataFrame:
    """SafeMed-R1's two stages together: each model's certified accuracy at the claim's radii (each
    sigma), paired against SFT + smoothing of the same prompt form on the same questions (exact McNemar
    on "right with a certified radius >= r")."""
    rows = []
    for (name, sigma), g in certs.groupby(["model", "sigma"], sort=False):
        ref_name = "sft-" + name.rsplit("-", 1)[1]
        ref = certs[(certs["model"] == ref_name) & (certs["sigma"] == sigma)]
        if name == ref_name or ref.empty:
            continue
        for r in CLAIM_TARGETS:
            def hit(df):
                return df.assign(correct=df["correct"].astype(bool) & (df["radius"] >= r))[["question_id", "correct"]]
            t = evaluate.paired_test(hit(ref), hit(g))
            rows.append({"model": name, "against": ref_name, "sigma": sigma, "radius": r, "n": t["n"],
                         "cert_acc": t["acc_b"], "cert_acc_against": t["acc_a"], "diff": t["diff"],
                         "p_value": t["p_value"]})
    return pd.DataFrame(rows).round({"cert_acc": 1, "cert_acc_against": 1, "diff": 1, "p_value": 4})


def soundness_table(attacked: pd.DataFrame) -> pd.DataFrame:
    """Per model and radius, in %: certified accuracy and the smoothed model's accuracy under SmoothAdv on
    the same questions (PREDICT, abstentions wrong; and the top class of its n samples), and the certified
    questions SmoothAdv moved to another class (count; each certificate may fail with probability alpha)."""
    if attacked.empty:
        return pd.DataFrame()
    g = attacked.groupby(["model", "sigma", "radius"], sort=False)
    return pd.DataFrame({"n": g.size(), "certified_acc": 100 * g["certified"].mean(),
                         "acc_under_smoothadv": 100 * g["correct_adv"].mean(),
                         "top_class_right": 100 * g["top_adv_right"].mean(),
                         "abstain_under_smoothadv": 100 * g["abstain_adv"].mean(),
                         "violations": g["violation"].sum()}).round(1).reset_index()


def run(cfg) -> tuple[pd.DataFrame, list[str]]:
    """(every certification of ``certify.models``, the names skipped); each model is attacked too
    (``attack_model``; read back with ``attacks``). With ``certify.background`` the models are split
    into two queues of about equal samples, one done in a second process (its records are cached,
    so this process then reads them back)."""
    from ..workbook import background

    names, skipped = available(cfg, cfg.certify.models)
    job, mine = None, names
    if cfg.certify.background and len(names) > 1:
        queues, load = ([], []), [0, 0]
        for n in sorted(names, key=lambda n: -_samples(cfg, n)):
            i = int(load[1] < load[0])
            queues[i].append(n)
            load[i] += _samples(cfg, n)
        mine = [n for n in names if n in queues[0]]
        job = background(_certify_in_worker, cfg.model_dump(), queues[1], threads=cfg.threads)
    for n in mine:
        _certify_and_attack(cfg, n)
    if job is not None:
        job.result()
    frames = [certify_model(cfg, n) for n in names]
    return pd.concat([f for f in frames if len(f)], ignore_index=True), skipped


def attacks(cfg, certs: pd.DataFrame) -> pd.DataFrame:
    """``attack_model`` for every certified model (read back from the cache after ``run``)."""
    frames = [attack_model(cfg, n, certs) for n in certs["model"].unique()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _certify_and_attack(cfg, name: str) -> None:
    certs = certify_model(cfg, name)
    if len(certs):
        attack_model(cfg, name, certs)


def _samples(cfg, name: str) -> int:
    """Forward passes (fast path) or generations one model's certification takes, generations weighted 10x."""
    plan = _plan(cfg, name)
    return plan["items"] * (cfg.certify.n0 + plan["n"]) * (10 if plan["method"] == "generate" else 1)


def _certify_in_worker(cfg_dump: dict, names: list[str]) -> None:
    from ..config import Config

    cfg = Config.model_validate(cfg_dump)
    for n in names:
        _certify_and_attack(cfg, n)


def summary(cfg, certs: pd.DataFrame) -> pd.DataFrame:
    """Per model, sigma and modality (plus "All"): certified accuracy (%) at the profile's radii,
    the smoothed classifier's clean accuracy, abstentions and the base classifier's accuracy.
    Modalities with fewer than ``certify.min_group_items`` items get no row."""
    out = pd.concat({(m, s): sm.certified_summary(g, radii=cfg.certify.radii, by="modality")
                     for (m, s), g in certs.groupby(["model", "sigma"], sort=False)},
                    names=["model", "sigma"]).round(1)
    keep = (out.index.get_level_values("modality") == "All") | (out["n"] >= cfg.certify.min_group_items)
    return out[keep]


def curves(cfg, certs: pd.DataFrame) -> pd.DataFrame:
    """Certified accuracy against the L2 radius per model, sigma and modality (long form)."""
    c = cfg.certify
    grid = np.linspace(0, sm.max_certifiable_radius(max(c.sigmas), max(c.n, c.n_think), c.alpha) * 1.05, 300)
    return pd.concat([sm.certified_accuracy_curves(g, grid, by="modality").assign(model=m, sigma=s)
                      for (m, s), g in certs.groupby(["model", "sigma"], sort=False)], ignore_index=True)


def curves_figure(cfg, curves: pd.DataFrame):
    """One panel per sigma: certified accuracy against the radius, all modalities."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    c = cfg.certify
    fig, axes = plt.subplots(1, len(c.sigmas), figsize=(4.2 * len(c.sigmas), 3.4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], c.sigmas):
        sub = curves[(curves["sigma"] == s) & (curves["modality"] == "All")]
        sns.lineplot(data=sub, x="radius", y="certified_accuracy", hue="model", ax=ax, drawstyle="steps-post")
        ax.axvline(sm.max_certifiable_radius(s, c.n, c.alpha), color="grey", ls=":", lw=1)
        ax.set(title=f"sigma = {s}", xlabel="L2 radius (pixels in [0,1])", ylabel="certified accuracy", ylim=(0, 1))
    fig.suptitle(f"Certified accuracy vs L2 radius, all modalities (profile {cfg.profile}; dotted: max radius at n)")
    fig.tight_layout()
    return fig


def modality_figure(cfg, curves: pd.DataFrame):
    """Certified accuracy against the radius per modality (those with ``certify.min_group_items`` items)."""
    import seaborn as sns

    sub = curves[(curves["modality"] != "All") & (curves["n"] >= cfg.certify.min_group_items)]
    if sub.empty:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no modality has {cfg.certify.min_group_items} certified items (certify.min_group_items)",
                ha="center", va="center")
        return fig
    g = sns.relplot(data=sub, x="radius", y="certified_accuracy", hue="model",
                    style="sigma", col="modality", col_wrap=4, kind="line", drawstyle="steps-post", height=2.4,
                    aspect=1.2)
    g.set(ylim=(0, 1))
    g.figure.suptitle(f"Certified accuracy per modality (profile {cfg.profile})", y=1.02)
    return g.figure


# The criterion of the smoothing claim, fixed before the runs (issue #35): Cohen et al.'s noise-trained
# CIFAR-10 ResNet-110 certifies 60% at r = 0.25 (sigma 0.25) and 42% at 0.5 (sigma 0.5).
CLAIM_TARGETS = {0.25: 60.0, 0.5: 40.0}   # L2 radius -> certified accuracy (%) the best model must reach
CLAIM_MIN_ITEMS, CLAIM_MIN_N = 100, 1000  # the sample a verdict needs (fewer: cannot tell)


def claim(cfg, overall: pd.DataFrame, certs: pd.DataFrame) -> dict:
    """The smoothing claim: some model's certified accuracy (best sigma per radius) reaches every one of
    ``CLAIM_TARGETS``, on at least ``CLAIM_MIN_ITEMS`` items certified with n >= ``CLAIM_MIN_N`` (None:
    no model certified on such a sample). ``ours`` names the model nearest to, or furthest past, them."""
    c = cfg.certify
    t = overall.reset_index()
    t = t[(t["n"] >= CLAIM_MIN_ITEMS) & t["model"].map(lambda m: _plan(cfg, m)["n"] >= CLAIM_MIN_N)]
    if t.empty:
        return dict(claim_id="safemed.smoothing_certifies", holds=None,
                    ours=f"no model certified on {CLAIM_MIN_ITEMS} items with n >= {CLAIM_MIN_N} on this profile",
                    detail=f"{len(certs)} certifications; n0={c.n0}, n={c.n}")
    best = {m: {r: g[f"cert_acc@{r:g}"].max() for r in CLAIM_TARGETS} for m, g in t.groupby("model")}
    margin = {m: min(b[r] - v for r, v in CLAIM_TARGETS.items()) for m, b in best.items()}
    name = max(margin, key=margin.get)  # the model nearest to (or furthest past) every target
    ours = (f"{name}: " + ", ".join(f"{best[name][r]:.1f}% certified at r = {r:g} (target {v:.0f}%)"
                                   for r, v in CLAIM_TARGETS.items())
            + f"; {int(t['n'].max())} items, n0={c.n0}, n={c.n}, alpha={c.alpha}, best sigma per radius")
    return dict(claim_id="safemed.smoothing_certifies", ours=ours,
                holds=bool(margin[name] >= 0),
                detail="; ".join(f"{m}: " + ", ".join(f"{v:.1f}@{r:g}" for r, v in b.items()) for m, b in best.items()))


def seconds(certs: pd.DataFrame, t0: float) -> str:
    return (f"{len(certs)} certifications in {time.perf_counter() - t0:.0f} s "
            f"(mean {certs['seconds'].mean():.2f} s per item and sigma)")
