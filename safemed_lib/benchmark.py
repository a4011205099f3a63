"""One evaluation entry point: clean and attacked accuracy of a model on a profile's test split, with per-item records.

:func:`benchmark` is RobustBench's ``benchmark(model, n, threat_model)`` for this workbook (and the
function behind ``python -m safemed_lib eval``): a zoo name or a checkpoint directory, a prompt
form, n test questions, a threat model (PGD, L-inf in 1/255 or L2, steps, restarts); it writes
per-item records (resumable) and returns a summary with ``n``, ``clean_acc`` and ``attacked_acc``
as fractions. :func:`evaluate_attacks` runs a grid of attacks on one model (notebook 03's sweep);
:func:`sweep_table` tabulates it.
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
                steps: int = 10) -> list[dict]:
    """The settings of 03_attack: L-inf radii in 1/255 units and L2 radii in [0,1] pixel units,
    each with Madry's step size (:func:`attacks.default_alpha`; 2/255 for 8/255 in 10 steps). Each entry:
    ``{"name", "norm", "eps", "alpha", "steps"}``; the clean run is not included."""
    grid = [{"name": f"linf_{e:g}", "norm": "linf", "eps": e / 255, "steps": steps} for e in linf_eps]
    grid += [{"name": f"l2_{e:g}", "norm": "l2", "eps": float(e), "steps": steps} for e in l2_eps]
    for g in grid:
        g["alpha"] = attacks.default_alpha(g["eps"], steps)
    return grid


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
    models their ``clean_reasoning`` target without generating twice.

    Returns one long DataFrame: evaluate's rows plus ``model`` (= ``tag``), ``attack`` (``clean`` or
    the grid name), ``norm`` and ``eps`` (0 for clean).
    """
    import pandas as pd

    from .paths import resolve

    records_dir = resolve(records_dir)
    names = [g["name"] for g in grid]
    if len(set(names)) != len(names) or "clean" in names:
        raise ValueError(f"grid names must be unique and not 'clean', got {names}")
    common = dict(prompt=prompt, image_size=image_size, method=method, batch_size=batch_size,
                  max_new_tokens=max_new_tokens)

    def path(name, *settings):
        key = json.dumps([prompt, image_size, method, max_new_tokens, *settings], sort_keys=True)
        return records_dir / f"{tag}_{name}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.jsonl"

    clean = evaluate.evaluate(vlm, items, records_path=path("clean"), desc=f"{tag} clean", **common)
    frames = [clean.assign(model=tag, attack="clean", norm="none", eps=0.0)]
    outputs = dict(zip(clean["question_id"], clean["output"]))
    for g in grid:
        hook = attacks.pgd_perturb(vlm, prompt=prompt, eps=g["eps"], alpha=g.get("alpha"), steps=g["steps"], norm=g["norm"],
                           target=target, restarts=restarts, seed=seed, rounding=rounding,
                           clean_outputs=outputs if method == "generate" else None, max_new_tokens=max_new_tokens)
        settings = dict(g, seed=seed, restarts=restarts, target=target, rounding=rounding)
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
        out["eps_label"] = [f"{e * 255:g}/255" if n == "linf" else ("0" if n == "none" else f"{e:g}")
                            for n, e in zip(out["norm"], out["eps"])]
    return out


THREATS = ("none", "pgd")


def mode_of(model: str) -> str | None:
    """The prompt form a zoo name implies ("...-think" / "...-nothink"), else None."""
    for mode in ("nothink", "think"):
        if str(model).endswith(f"-{mode}"):
            return mode
    return None


def benchmark(model: str | Path, cfg, *, mode: str | None = None, n: int | None = None, bench_seed: int | None = None,
              attack: str = "pgd", norm: str = "linf", eps: float = 8, steps: int = 10, restarts: int = 1,
              method: str = "generate", out: str | Path | None = None) -> dict:
    """Clean and attacked accuracy of ``model`` (a zoo name, trained if missing, or a checkpoint
    directory) on ``n`` questions (None: ``cfg.eval.n``; 0: all) of the profile's test split, or of
    the test split of a benchmark generated with ``bench_seed``.

    ``attack``: "none" or "pgd" (``attacks.pgd_perturb``: the NLL of the reference answer, after the
    model's own clean reasoning for think models; step 2.5 eps / steps; a random start per question
    seeded by (cfg.seed, question id); the worst of ``restarts``; rounded to the 8-bit grid).
    ``eps``: the radius, in 1/255 for ``norm="linf"`` and in [0, 1] pixel units for ``"l2"``.
    Records live in ``runs/eval/<profile>/<model>-<fingerprint>/`` (resumable). With ``out`` the
    summary and the per-item records are written there as JSON. Returns the summary: ``model``,
    ``mode``, ``n``, ``clean_acc`` and ``attacked_acc`` (fractions; None without an attack) and the settings."""
    from . import dataset, runs, zoo
    from .paths import RUNS
    from .records import atomic_write_text

    if attack not in THREATS:
        raise ValueError(f"attack must be one of {THREATS}, got {attack!r}")
    if norm not in attacks.NORMS:
        raise ValueError(f"norm must be one of {attacks.NORMS}, got {norm!r}")
    mode = mode or mode_of(model)
    if mode is None:
        raise ValueError(f"{model}: say which prompt form it answers in (mode think or nothink)")
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
    run_dir = RUNS / "eval" / cfg.profile / f"{Path(str(model)).name}-{runs.fingerprint([model_key, settings])}"
    ev = dict(prompt=mode, image_size=cfg.data.image_size, method=method, batch_size=cfg.eval.batch_size,
              max_new_tokens=cfg.eval.max_new_tokens)
    clean = evaluate.cached(load, items, run_dir / "clean", model_key=model_key, **ev)
    attacked = None
    if attack == "pgd":
        outputs = dict(zip(clean["question_id"], clean["output"])) if method == "generate" else None

        def perturb(images, batch):
            return attacks.pgd_perturb(load(), prompt=mode, eps=radius, steps=steps, norm=norm, restarts=restarts,
                                       seed=cfg.seed, clean_outputs=outputs,
                                       max_new_tokens=cfg.eval.max_new_tokens)(images, batch)
        attacked = evaluate.cached(load, items, run_dir / "attacked", model_key=model_key, extra_key=settings,
                                   perturb=perturb, **ev)
    summary = {"model": str(model), "mode": mode, "profile": cfg.profile, "n": len(items),
               "clean_acc": float(clean["correct"].mean()),
               "attacked_acc": None if attacked is None else float(attacked["correct"].mean()),
               "settings": {**settings, "image_size": cfg.data.image_size, "max_new_tokens": cfg.eval.max_new_tokens,
                            "alpha": None if attack == "none" else attacks.default_alpha(eps, steps)},
               "records": str(run_dir)}
    if out is not None:
        rows = clean[["question_id", "modality", "question_type", "answer", "pred", "correct"]].rename(
            columns={"pred": "clean_pred", "correct": "clean_correct"})
        if attacked is not None:
            rows = rows.assign(attacked_pred=attacked["pred"].values, attacked_correct=attacked["correct"].values)
        atomic_write_text(out, json.dumps({**summary, "items": rows.to_dict(orient="records")}, indent=1) + "\n")
    return summary
