"""One evaluation entry point: clean and attacked accuracy of a model on a profile's test split, with per-item records.

:func:`benchmark` is RobustBench's ``benchmark(model, n, threat_model)`` for this workbook (and the
function behind ``python -m safemed_lib eval``): a zoo name or a checkpoint directory, a prompt
form, n test questions, a threat model (PGD, L-inf in 1/255 or L2, steps, restarts); it writes
per-item records (resumable) and returns a summary with ``n``, ``clean_acc`` and ``attacked_acc``
as fractions. :func:`evaluate_attacks` runs a grid of attacks on one model (notebook 03's sweep);
:func:`sweep_table` tabulates it, :func:`strongest` takes the worst case per question over several
attacks, and :func:`masking_checks` runs Carlini et al.'s sanity checks for gradient masking on it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from . import attacks, evaluate


def model_digest(model) -> str:
    """A short SHA-1 of a model's parameters (names and bytes): an id of exact weights."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def attack_grid(linf_eps: Sequence[float] = (1, 2, 4, 8, 16), l2_eps: Sequence[float] = (0.25, 0.5, 1.0),
                steps: int = 10, *, restarts: int = 1, target: str | None = None, random_start: bool = True,
                suffix: str = "") -> list[dict]:
    """The settings of 03_attack: L-inf radii in 1/255 units and L2 radii in [0,1] pixel units,
    each with Madry's step size (:func:`attacks.default_alpha`; 2/255 for 8/255 in 10 steps). Each entry:
    ``{"name", "norm", "eps", "alpha", "steps"}``, plus ``restarts``, ``target`` (an
    ``attacks.TARGETS`` objective) and ``random_start`` where they differ from the defaults (1, the
    call's target, True), which override :func:`evaluate_attacks`' own for that entry; names end in
    ``suffix``. Grids add up: ``attack_grid((8,), (), 10) + attack_grid((8,), (), 50, restarts=5,
    suffix="_x5") + attack_grid((8,), (), 10, target="margin", suffix="_margin")``. No clean run."""
    if target is not None and target not in attacks.TARGETS:
        raise ValueError(f"target must be one of {attacks.TARGETS} or None, got {target!r}")
    extra = {k: v for k, v, default in (("restarts", restarts, 1), ("target", target, None),
                                        ("random_start", random_start, True)) if v != default}
    grid = [{"name": f"linf_{e:g}{suffix}", "norm": "linf", "eps": e / 255, "steps": steps} for e in linf_eps]
    grid += [{"name": f"l2_{e:g}{suffix}", "norm": "l2", "eps": float(e), "steps": steps} for e in l2_eps]
    for g in grid:
        g["alpha"] = attacks.default_alpha(g["eps"], steps)
        g.update(extra)
    return grid


def fork_attack(eps: float = 0.03, alpha: float = 0.01, steps: int = 10, name: str = "fork_first_token") -> dict:
    """The evaluation attack of IgoyAI/AdvMed-R1 (SafeMed-R1's first author's fork) as a grid entry:
    the first completion token's cross-entropy, eps 0.03, step 0.01, 10 steps, no random start. The
    fork applies these to the normalized ``pixel_values`` and clamps those to [0, 1], which bounds
    nothing in pixel space; here eps is an L-inf radius on the [0, 1] image (0.03 ~ 7.7/255)."""
    return {"name": name, "norm": "linf", "eps": float(eps), "alpha": float(alpha), "steps": int(steps),
            "target": "first_token", "random_start": False}


def evaluate_attacks(vlm, items: Sequence, *, prompt: str, image_size: int | None, grid: Sequence[dict],
                     records_dir, tag: str, method: str = "generate", batch_size: int = 16,
                     max_new_tokens: int = 64, seed: int = 0, restarts: int = 1, target: str = "auto",
                     rounding: bool = True):
    """Clean evaluation, then one attacked evaluation per ``grid`` entry (see :func:`attack_grid`),
    all through ``evaluate.evaluate`` with per-item records
    ``<records_dir>/<tag>_<name>_<digest>.jsonl`` (so an interrupted run resumes), the digest
    covering every setting of that run. ``records_dir`` belongs to ONE model (e.g. a run
    directory of ``runs.cached`` keyed by the model): records are reused across calls that share
    settings (a sweep on a subset of the items reads the main run's). The clean outputs give think
    models their ``clean_reasoning`` target without generating twice. An entry's own ``restarts``,
    ``target`` and ``random_start`` override the call's ``restarts`` and ``target`` (and True).

    Returns one long DataFrame: evaluate's rows plus ``model`` (= ``tag``), ``attack`` (``clean`` or
    the grid name), ``norm`` and ``eps`` (0 for clean).
    """
    import pandas as pd

    from .paths import resolve

    records_dir = resolve(records_dir)
    names = [g["name"] for g in grid]
    if len(set(names)) != len(names) or "clean" in names:
        raise ValueError(f"grid names must be unique and not 'clean', got {names}")
    for g in grid:  # every entry's objective is checked before anything runs
        attacks._resolve_target(g.get("target", target), prompt)
    common = dict(prompt=prompt, image_size=image_size, method=method, batch_size=batch_size,
                  max_new_tokens=max_new_tokens)

    def path(name, *settings):
        key = json.dumps([prompt, image_size, method, max_new_tokens, *settings], sort_keys=True)
        return records_dir / f"{tag}_{name}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.jsonl"

    clean = evaluate.evaluate(vlm, items, records_path=path("clean"), desc=f"{tag} clean", **common)
    frames = [clean.assign(model=tag, attack="clean", norm="none", eps=0.0)]
    outputs = dict(zip(clean["question_id"], clean["output"]))
    for g in grid:
        r, t = g.get("restarts", restarts), g.get("target", target)
        hook = attacks.pgd_perturb(vlm, prompt=prompt, eps=g["eps"], alpha=g.get("alpha"), steps=g["steps"],
                                   norm=g["norm"], target=t, restarts=r, random_start=g.get("random_start", True),
                                   seed=seed, rounding=rounding, max_new_tokens=max_new_tokens,
                                   clean_outputs=outputs if method == "generate" else None)
        # the same digest as before per-entry settings existed: an entry's own keys are in g already
        settings = dict(g, seed=seed, restarts=r, target=t, rounding=rounding)
        df = evaluate.evaluate(vlm, items, records_path=path(g["name"], settings), perturb=hook,
                         desc=f"{tag} {g['name']}", **common)
        frames.append(df.assign(model=tag, attack=g["name"], norm=g["norm"], eps=float(g["eps"])))
    return pd.concat(frames, ignore_index=True)


def sweep_table(df, by: Sequence[str] = ("model", "norm", "eps")):
    """Accuracy (%), invalid-answer rate (%) and item count per (model, norm, eps) of
    :func:`evaluate_attacks`' output, with eps also in 1/255 units for L-inf."""
    by = list(by)
    out = (df.groupby(by, sort=True)
             .agg(accuracy=("correct", lambda c: 100.0 * c.astype(bool).mean()),
                  invalid=("pred", lambda p: 100.0 * p.isna().mean()), n=("correct", "size"))
             .reset_index())
    if "norm" in out:
        order = {"none": 0, "linf": 1, "l2": 2}
        out = out.sort_values(by, key=lambda c: c.map(order) if c.name == "norm" else c, kind="stable")
        out = out.reset_index(drop=True)
    if "eps" in out and "norm" in out:
        out["eps_label"] = [eps_label(n, e) for n, e in zip(out["norm"], out["eps"])]
    return out


def eps_label(norm: str, eps: float) -> str:
    """A radius as written in tables: "8/255" for L-inf, the L2 radius as is, "0" for clean."""
    return f"{eps * 255:g}/255" if norm == "linf" else ("0" if norm == "none" else f"{eps:g}")


def _by_model(df):
    return df.groupby("model", sort=False) if "model" in df else [("", df)]


def _correct(df, attack: str):
    """Per question (index question_id) correctness under one attack, as bools."""
    return df[df["attack"] == attack].set_index("question_id")["correct"].astype(bool)


def strongest(df, attack_names: Sequence[str] | None = None, *, include_clean: bool = True,
              label: str = "worst case"):
    """Accuracy (%) under each attack and under the strongest one per question.

    ``df``: :func:`evaluate_attacks` rows (``attack``, ``question_id``, ``correct``; ``model``,
    ``norm`` and ``eps`` where present), e.g. PGD-10, PGD-50 x 5 restarts and the margin attack at
    one radius. ``attack_names``: the attacks compared (default: all in ``df``). A question counts
    as robust (row ``label``) only if it is answered right under every one of them, and clean too
    with ``include_clean`` (as AutoAttack counts). Every attack must cover the same questions, and
    the attacks one radius (a worst case over radii would mix threat models); both raise.
    Returns rows ``model, attack, accuracy, n``: clean (if present), each attack, then ``label``.
    """
    import pandas as pd

    rows = []
    for model, d in _by_model(df):
        names = list(attack_names) if attack_names is not None else [a for a in d["attack"].unique() if a != "clean"]
        missing = [a for a in names + ["clean"] * include_clean if a not in set(d["attack"])]
        if missing or not names:
            raise ValueError(f"strongest: model {model!r} has no rows for attack(s) {missing or names}")
        attacked = d[d["attack"].isin(names)]
        if {"norm", "eps"} <= set(d) and len(attacked.groupby(["norm", "eps"])) > 1:
            raise ValueError(f"strongest: attacks {names} of model {model!r} have different radii; "
                             "pass attack_names= of one radius")
        shown = ["clean"] * ("clean" in set(d["attack"])) + names
        cols = {a: _correct(d, a) for a in shown}
        qids = set(cols[shown[0]].index)
        for a, c in cols.items():
            if set(c.index) != qids:
                raise ValueError(f"strongest: attack {a!r} of model {model!r} covers {len(c)} questions, "
                                 f"{shown[0]!r} {len(qids)}; evaluate every attack on the same questions")
        worst = pd.concat([cols[a] for a in names + ["clean"] * include_clean], axis=1).all(axis=1)
        for a, c in list(cols.items()) + [(label, worst)]:
            rows.append({"model": model, "attack": a, "accuracy": 100.0 * c.mean(), "n": len(c)})
    return pd.DataFrame(rows)


THREATS = ("none", "pgd")


class SettingsError(ValueError):
    """A bad argument of :func:`benchmark`, found before any model is loaded (the CLI prints it)."""


def mode_of(model: str) -> str | None:
    """The prompt form a zoo name implies ("...-think" / "...-nothink"), else None."""
    for mode in ("nothink", "think"):
        if str(model).endswith(f"-{mode}"):
            return mode
    return None


def benchmark(model: str | Path, cfg, *, mode: str | None = None, n: int | None = None, bench_seed: int | None = None,
              attack: str = "pgd", norm: str = "linf", eps: float = 8, steps: int = 10, restarts: int = 1,
              target: str = "auto", method: str = "generate", out: str | Path | None = None) -> dict:
    """Clean and attacked accuracy of ``model`` (a zoo name, trained if missing, or a checkpoint
    directory) on ``n`` questions (None: ``cfg.eval.n``; 0: all) of the profile's test split, or of
    the test split of a benchmark generated with ``bench_seed``.

    ``attack``: "none" or "pgd" (``attacks.pgd_perturb``: the NLL of the reference answer, after the
    model's own clean reasoning for think models; step 2.5 eps / steps; a random start per question
    seeded by (cfg.seed, question id); the worst of ``restarts``; rounded to the 8-bit grid).
    ``eps``: the radius, in 1/255 for ``norm="linf"`` and in [0, 1] pixel units for ``"l2"``.
    ``target``: the attack's objective (``attacks.attack_loss``: auto, answer, clean_reasoning,
    first_token, or margin for answer-first prompts).
    Records live in ``runs/eval/<profile>/<model>-<fingerprint>/`` (resumable). With ``out`` the
    summary and the per-item records are written there as JSON. Returns the summary: ``model``,
    ``mode``, ``n``, ``clean_acc`` and ``attacked_acc`` (fractions; None without an attack) and the settings."""
    from . import dataset, runs, zoo
    from .paths import RUNS
    from .records import atomic_write_text

    if attack not in THREATS:
        raise SettingsError(f"attack must be one of {THREATS}, got {attack!r}")
    if norm not in attacks.NORMS:
        raise SettingsError(f"norm must be one of {attacks.NORMS}, got {norm!r}")
    mode = mode or mode_of(model)
    if mode is None:
        raise SettingsError(f"{model}: say which prompt form it answers in (mode think or nothink)")
    try:
        attacks._resolve_target(target, mode)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    _, test = dataset.splits(cfg, bench_seed=bench_seed)
    items = evaluate.subset(test, cfg.eval.n if n is None else n, seed=cfg.seed)
    is_name = not Path(str(model)).is_dir()
    cache = {}

    def load():
        if "vlm" not in cache:
            cache["vlm"] = zoo.load(model, cfg)
        return cache["vlm"]

    model_key = zoo.key(str(model), cfg) if is_name else model_digest(load().model)
    radius = eps / 255 if norm == "linf" else float(eps)
    settings = {"mode": mode, "method": method, "bench_seed": bench_seed, "attack": attack, "norm": norm,
                "eps": eps, "steps": steps, "restarts": restarts, "seed": cfg.seed}
    if target != "auto":  # the default stays out of the key: earlier runs keep their records
        settings["target"] = target
    run_dir = RUNS / "eval" / cfg.profile / f"{Path(str(model)).name}-{runs.fingerprint([model_key, settings])}"
    ev = dict(prompt=mode, image_size=cfg.data.image_size, method=method, batch_size=cfg.eval.batch_size,
              max_new_tokens=cfg.eval.max_new_tokens)
    clean = evaluate.cached(load, items, run_dir / "clean", model_key=model_key, **ev)
    attacked = None
    if attack == "pgd":
        outputs = dict(zip(clean["question_id"], clean["output"])) if method == "generate" else None

        def perturb(images, batch):
            return attacks.pgd_perturb(load(), prompt=mode, eps=radius, steps=steps, norm=norm, restarts=restarts,
                                       target=target, seed=cfg.seed, clean_outputs=outputs,
                                       max_new_tokens=cfg.eval.max_new_tokens)(images, batch)
        attacked = evaluate.cached(load, items, run_dir / "attacked", model_key=model_key, extra_key=settings,
                                   perturb=perturb, **ev)
    summary = {"model": str(model), "mode": mode, "profile": cfg.profile, "n": len(items),
               "clean_acc": float(clean["correct"].mean()),
               "attacked_acc": None if attacked is None else float(attacked["correct"].mean()),
               "settings": {**settings, "target": target, "image_size": cfg.data.image_size,
                            "max_new_tokens": cfg.eval.max_new_tokens,
                            "alpha": None if attack == "none" else attacks.default_alpha(eps, steps)},
               "records": str(run_dir)}
    if out is not None:
        rows = clean[["question_id", "modality", "question_type", "answer", "pred", "correct"]].rename(
            columns={"pred": "clean_pred", "correct": "clean_correct"})
        if attacked is not None:
            rows = rows.assign(attacked_pred=attacked["pred"].values, attacked_correct=attacked["correct"].values)
        atomic_write_text(out, json.dumps({**summary, "items": rows.to_dict(orient="records")}, indent=1) + "\n")
    return summary


def masking_checks(sweep, *, chance: float, tol: int = 0, large_eps: float | dict = 64 / 255,
                   pairs: Sequence[tuple[str, str]] = (), sweep_attacks: Sequence[str] | None = None):
    """Gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness", sec. 5):
    one row per comparison with the measured number, its limit and whether it passed.

    ``sweep``: :func:`evaluate_attacks` rows. ``tol``: the slack, in questions (sampling noise of
    a random start, say). Checks, per model:

    * ``monotone``: accuracy never rises with eps: per norm, the number right at each radius
      (``sweep_attacks``, default every attack but clean; one per radius) minus the fewest right at
      any smaller radius, clean included, on the questions common to all of them; at most ``tol``.
    * ``chance``: at the largest radius >= ``large_eps`` (a float: L-inf; or {norm: eps}) the
      accuracy is at most ``chance`` (a fraction, e.g. 1/3) + tol questions; passed is None when
      the sweep has no such radius.
    * ``stronger``: for each ``(standard, stronger)`` pair of attack names (PGD-10 vs PGD-50 x 5),
      the questions the stronger attack gets right but the standard one does not: at most ``tol``.

    Returns rows ``model, check, compared, value, limit, n, passed``.
    """
    import pandas as pd

    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance must be a fraction in [0, 1], got {chance}")
    if int(tol) != tol or tol < 0:
        raise ValueError(f"tol must be a number of questions >= 0, got {tol}")
    large = large_eps if isinstance(large_eps, dict) else {"linf": float(large_eps)}
    rows = []
    for model, d in _by_model(sweep):
        for row in _monotone(d, tol, sweep_attacks) + _chance(d, chance, tol, large, sweep_attacks) + \
                _stronger(d, tol, pairs):
            rows.append({"model": model, **row})
    return pd.DataFrame(rows, columns=["model", "check", "compared", "value", "limit", "n", "passed"])


def _levels(d, sweep_attacks) -> dict[str, list[tuple[float, str]]]:
    """{norm: [(eps, attack), ...] sorted by eps} of the sweep's attacks (one attack per radius)."""
    names = list(sweep_attacks) if sweep_attacks is not None else [a for a in d["attack"].unique() if a != "clean"]
    levels: dict[str, list[tuple[float, str]]] = {}
    for a in names:
        rows = d[d["attack"] == a]
        if rows.empty:
            raise ValueError(f"masking_checks: sweep_attacks names attack {a!r}, which has no rows")
        levels.setdefault(rows["norm"].iloc[0], []).append((float(rows["eps"].iloc[0]), a))
    for norm, lv in levels.items():
        eps = [e for e, _ in lv]
        if len(set(eps)) != len(eps):
            raise ValueError(f"masking_checks: several attacks at one {norm} radius in {[a for _, a in lv]}; "
                             "pass sweep_attacks= with one attack per radius")
        lv.sort()
    return levels


def _monotone(d, tol, sweep_attacks) -> list[dict]:
    rows = []
    for norm, lv in _levels(d, sweep_attacks).items():
        chain = ([(0.0, "clean")] if (d["attack"] == "clean").any() else []) + lv
        cols = {a: _correct(d, a) for _, a in chain}
        common = sorted(set.intersection(*(set(c.index) for c in cols.values())))
        right = {a: int(c.loc[common].sum()) for a, c in cols.items()}
        for i in range(1, len(chain)):
            best_e, best_a = min(chain[:i], key=lambda ea: right[ea[1]])
            e, a = chain[i]
            rise = right[a] - right[best_a]
            rows.append({"check": "monotone", "compared": f"{norm} {eps_label(norm, e)} vs "
                         f"{'clean' if best_a == 'clean' else eps_label(norm, best_e)} (fewest right below)",
                         "value": rise, "limit": tol, "n": len(common), "passed": rise <= tol})
    return rows


def _chance(d, chance, tol, large, sweep_attacks) -> list[dict]:
    rows, levels = [], _levels(d, sweep_attacks)
    for norm, eps in large.items():
        big = [(e, a) for e, a in levels.get(norm, []) if e >= eps - 1e-9]
        if not big:
            rows.append({"check": "chance", "compared": f"{norm}: no radius >= {eps_label(norm, eps)} in the sweep",
                         "value": float("nan"), "limit": chance, "n": 0, "passed": None})
            continue
        e, a = big[-1]
        c = _correct(d, a)
        limit = chance + tol / len(c)
        rows.append({"check": "chance", "compared": f"{norm} {eps_label(norm, e)} accuracy vs chance {chance:.3g}",
                     "value": float(c.mean()), "limit": limit, "n": len(c), "passed": bool(c.mean() <= limit + 1e-12)})
    return rows


def _stronger(d, tol, pairs) -> list[dict]:
    rows = []
    for standard, strong in pairs:
        for a in (standard, strong):
            if not (d["attack"] == a).any():
                raise ValueError(f"masking_checks: pairs names attack {a!r}, which has no rows")
        s, t = _correct(d, standard), _correct(d, strong)
        common = s.index.intersection(t.index)
        gained = int((t.loc[common] & ~s.loc[common]).sum())
        rows.append({"check": "stronger", "compared": f"{strong} right where {standard} is wrong", "value": gained,
                     "limit": tol, "n": len(common), "passed": gained <= tol})
    return rows
