"""The model zoo: every model of the workbook by name, trained through the run cache when missing.

    vlm = zoo.load("atgrpo-think", cfg)         # trains base -> sft-think -> atgrpo-think if needed
    vlm = zoo.load("path/to/checkpoint", cfg)   # a saved VLM or a Qwen2-VL checkpoint directory
    zoo.ensure("sft-nothink", cfg)              # train (or find) without loading
    zoo.names(cfg)                              # what the profile can name

Names (``<m>`` is think or nothink):

==========================  ====================================================  =====================
name                        what                                                  starts from
==========================  ====================================================  =====================
``base``                    ``model.path``, or the tiny base built here           nothing
``sft-<m>``                 the standard fine-tuned baseline (``sft.<m>``)        base
``sftat-<m>``               AT-SFT: Madry adversarial fine-tuning                 sft-<m>
``grpo-<m>``                GRPO (``safemed.grpo.<m>``)                           sft-<m>
``atgrpo-<m>``              AT-GRPO: GRPO on PGD images (``safemed.train_attack``) sft-<m>
``sftnoise-<m>``            SFT under Gaussian noise (``certify.noise_sft``)       sft-<m>
``grponoise-<m>``           GRPO under Gaussian noise (``certify.noise_grpo``)    sft-<m>
``atgrponoise-<m>``         AT-GRPO, then Gaussian noise on the rollouts' images  sft-<m>
``r2-stepwise``, ``r2-plain``  stepwise / plain fine-tuning on Med-R2 cases      sft-nothink
``r2-<mode>-s<k>``          the same with training seed ``seed + k``             sft-nothink
``medr1-warmup``            Med-R1's base (short general SFT; ``medr1.warmup``)   base
``medr1-<by>-<sft|grpo>-<group>``  one cell of Med-R1's protocols                 medr1-warmup
==========================  ====================================================  =====================

Each model is a run of :mod:`safemed_lib.runs` in ``<cfg.models_dir>/<name>``, keyed by its recipe,
its training data, the seed and its parent's key, so changing anything upstream retrains what
depends on it (and nothing else).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from . import data, dataset, models, runs

MODES = ("think", "nothink")


@dataclass(frozen=True)
class Spec:
    """How to make one model: ``key`` (what it depends on), ``parent`` (the zoo name it starts
    from), ``train(start_vlm, run_dir) -> result`` (trains into ``run_dir``; the result's ``model``
    names the model folder inside it). ``path``: a model that needs no training (a checkpoint);
    ``alias``: the zoo name this one is the same model as."""

    name: str
    key: dict | None = None
    parent: str | None = None
    train: Callable[[Any, Path], dict] | None = None
    path: Path | None = None
    alias: str | None = None  # another name this one stands for (Med-R1's warm-up on a pretrained checkpoint)


def slug(group: str) -> str:
    """A folder-safe name of a modality or question type ("Disease Diagnosis" -> "disease-diagnosis")."""
    return re.sub(r"[^A-Za-z0-9]+", "-", group).strip("-").lower()


@contextmanager
def _threads(n: int | None):
    """torch threads ``n`` while training (None: unchanged); restored afterwards."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(int(n))
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the specs
def _base(cfg) -> Spec:
    if cfg.model.path:
        from .paths import resolve

        return Spec("base", path=resolve(cfg.model.path))
    from . import base

    train, _ = dataset.splits(cfg)
    key = base.plan(train, cfg.model.tiny, image_size=cfg.data.image_size, seed=cfg.seed)

    def fn(_, run_dir):
        base.build(train, cfg.model.tiny, image_size=cfg.data.image_size, seed=cfg.seed, out_dir=run_dir,
                   extra_dir=cfg.models_dir / "pretrain_images")
        return {"model": "model"}
    return Spec("base", key, None, fn)


def _sft_run(items, recipe, *, variant, image_size, seed, adversarial=None, log_every=10, save_every=100):
    """A ``Spec.train`` that runs ``sft.train_sft`` into ``<run_dir>/train``."""
    def fn(vlm, run_dir):
        from . import sft

        with _threads(recipe.threads):
            sft.train_sft(vlm, items, recipe, variant=variant, out_dir=run_dir / "train", image_size=image_size,
                          seed=seed, adversarial=adversarial, log_every=log_every, save_every=save_every)
        return {"model": "train/" + sft.read_run(run_dir / "train")["model"]}
    return fn


def _sft_key(kind, items, recipe, *, variant, image_size, seed, **extra) -> dict:
    from .targets import TARGET_FORMAT

    return {"kind": kind, "variant": variant, "recipe": recipe.key(),
            "train": runs.ids_digest(items), "n_train": len(items), "image_size": image_size, "seed": seed,
            "target_format": TARGET_FORMAT, **extra}


def _sft(cfg, variant: str) -> Spec:
    train, _ = dataset.splits(cfg)
    recipe = getattr(cfg.sft, variant)
    kw = dict(variant=variant, image_size=cfg.data.image_size, seed=cfg.seed)
    return Spec(f"sft-{variant}", _sft_key("sft", train, recipe, **kw), "base", _sft_run(train, recipe, **kw))


def train_attack(cfg) -> dict:
    """The training attack of AT-SFT (and, with its ramp, AT-GRPO) in pixel units [0, 1]."""
    return cfg.safemed.train_attack.pixels()


def _sftat(cfg, variant: str) -> Spec:
    train, _ = dataset.splits(cfg)
    recipe, adv = cfg.safemed.at_sft.recipe(), train_attack(cfg)
    kw = dict(variant=variant, image_size=cfg.data.image_size, seed=cfg.seed)
    return Spec(f"sftat-{variant}", _sft_key("at-sft", train, recipe, adversarial=adv, **kw), f"sft-{variant}",
                _sft_run(train, recipe, adversarial=adv, **kw))


def _sftnoise(cfg, variant: str) -> Spec:
    """SFT-<variant> fine-tuned under Gaussian noise (``certify.noise_sft``), with the SFT model's binding terms."""
    train, _ = dataset.splits(cfg)
    recipe = cfg.certify.noise_sft.recipe().model_copy(update={"binding": getattr(cfg.sft, variant).binding})
    kw = dict(variant=variant, image_size=cfg.data.image_size, seed=cfg.seed)
    return Spec(f"sftnoise-{variant}", _sft_key("noise-sft", train, recipe, **kw), f"sft-{variant}",
                _sft_run(train, recipe, **kw))


def _grpo_run(items, recipe, *, mode, image_size, seed, adversarial=None, save_steps=None):
    def fn(vlm, run_dir):
        from . import grpo

        vlm = grpo.train_grpo(vlm, items, recipe, mode=mode, out_dir=run_dir / "train", seed=seed,
                              adversarial=adversarial, image_size=image_size,
                              save_steps=save_steps or max(1, recipe.steps // 4))
        vlm.save(run_dir / "model")
        return {"model": "model"}
    return fn


def _grpo_key(kind, items, recipe, *, mode, image_size, seed, adversarial=None) -> dict:
    import trl

    return {"kind": kind, "mode": mode, "recipe": recipe.key(), "train": runs.ids_digest(items),
            "image_size": image_size, "seed": seed, "adversarial": adversarial, "trl": trl.__version__}


def _grpo(cfg, mode: str, adversarial: bool, noise: bool = False) -> Spec:
    """GRPO / AT-GRPO from sft-<mode>; with ``noise`` under Gaussian noise (``certify.noise_grpo``'s recipe)."""
    train, _ = dataset.splits(cfg)
    recipe = getattr(cfg.safemed.grpo, mode)
    if noise:
        recipe = cfg.certify.noise_grpo.recipe(recipe)
    adv = {**train_attack(cfg), "ramp_steps": cfg.safemed.train_attack.ramp_steps} if adversarial else None
    kw = dict(mode=mode, image_size=cfg.data.image_size, seed=cfg.seed, adversarial=adv)
    name = f"{'at' if adversarial else ''}grpo{'noise' if noise else ''}-{mode}"
    return Spec(name, _grpo_key("at-grpo" if adversarial else "grpo", train, recipe, **kw), f"sft-{mode}",
                _grpo_run(train, recipe, **kw))


def _r2(cfg, mode: str, seed: str | None = None) -> Spec:
    """Stepwise / plain fine-tuning on the Med-R2 training cases; ``-s<k>``: training seed ``seed + k``
    (same data and recipe; ``medr2.seeds`` of them are run)."""
    from . import medr2

    train_cases, _ = medr2.cases_for(cfg)
    items = medr2.training_items(train_cases, mode)
    recipe = cfg.medr2.ft
    kw = dict(variant="nothink", image_size=cfg.data.image_size, seed=cfg.seed + int(seed or 0))
    texts = "\n".join(f"{it.question_id}|{it.question}|{it.options}|{it.answer}" for it in items)
    key = _sft_key("r2", items, recipe, r2_mode=mode, texts=runs.fingerprint(texts), **kw)
    name = f"r2-{mode}" + (f"-s{seed}" if seed else "")
    return Spec(name, key, "sft-nothink", _sft_run(items, recipe, **kw))


def _medr1_warmup(cfg) -> Spec:
    w, mode = cfg.medr1.warmup, cfg.medr1.mode
    if cfg.model.path or w.steps == 0:
        return Spec("medr1-warmup", alias="base")
    from . import evaluate
    from .config import SFTRecipe

    train, _ = dataset.splits(cfg)
    items = evaluate.subset(train, w.items, seed=cfg.seed)
    recipe = SFTRecipe(steps=w.steps, lr=w.lr, batch_size=w.batch_size, format_only=w.format_only)
    kw = dict(variant=mode, image_size=cfg.data.image_size, seed=cfg.seed)
    return Spec("medr1-warmup", _sft_key("medr1-warmup", items, recipe, **kw), "base",
                _sft_run(items, recipe, log_every=max(1, w.steps // 10), save_every=max(1, w.steps // 2), **kw))


def medr1_groups(cfg, by: str) -> dict[str, list]:
    """``{group: its training items}`` of one Med-R1 protocol (``data.cross_splits``; groups without
    training items are left out)."""
    train, test = dataset.splits(cfg)
    return {g: items for g, (items, _) in data.cross_splits(train, test, by=by).items()}


def _medr1_cell(cfg, by: str, method: str, group_slug: str) -> Spec:
    groups = {slug(g): items for g, items in medr1_groups(cfg, by).items()}
    if group_slug not in groups:
        raise KeyError(f"no {by} group {group_slug!r} with training items; known: {sorted(groups)}")
    items, mode = groups[group_slug], cfg.medr1.mode
    name = f"medr1-{by.replace('_', '-')}-{method}-{group_slug}"
    if method == "sft":
        recipe = cfg.medr1.sft
        kw = dict(variant=mode, image_size=cfg.data.image_size, seed=cfg.seed)
        return Spec(name, _sft_key("medr1-sft", items, recipe, **kw), "medr1-warmup",
                    _sft_run(items, recipe, log_every=max(1, recipe.steps // 10), save_every=10 ** 6, **kw))
    recipe = cfg.medr1.grpo
    kw = dict(mode=mode, image_size=cfg.data.image_size, seed=cfg.seed)
    return Spec(name, _grpo_key("medr1-grpo", items, recipe, **kw), "medr1-warmup",
                _grpo_run(items, recipe, save_steps=max(1, recipe.steps // 2), **kw))


_FIXED = {"base": _base, "medr1-warmup": _medr1_warmup}
_PATTERNS = (
    (re.compile(r"sft-(think|nothink)"), _sft),
    (re.compile(r"sftat-(think|nothink)"), _sftat),
    (re.compile(r"sftnoise-(think|nothink)"), _sftnoise),
    (re.compile(r"grpo-(think|nothink)"), partial(_grpo, adversarial=False)),
    (re.compile(r"atgrpo-(think|nothink)"), partial(_grpo, adversarial=True)),
    (re.compile(r"grponoise-(think|nothink)"), partial(_grpo, adversarial=False, noise=True)),
    (re.compile(r"atgrponoise-(think|nothink)"), partial(_grpo, adversarial=True, noise=True)),
    (re.compile(r"r2-(stepwise|plain)(?:-s([1-9][0-9]*))?"), _r2),
    (re.compile(r"medr1-(modality|question-type)-(sft|grpo)-([a-z0-9-]+)"),
     lambda cfg, by, method, g: _medr1_cell(cfg, by.replace("-", "_"), method, g)),
)


def spec(name: str, cfg) -> Spec:
    """The :class:`Spec` of a zoo name (``KeyError`` naming the known names for anything else)."""
    if name in _FIXED:
        return _FIXED[name](cfg)
    for pattern, make in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return make(cfg, *m.groups())
    raise KeyError(f"unknown model {name!r}: expected a checkpoint directory or one of {', '.join(names(cfg))}")


def r2_names(cfg) -> list[str]:
    """The stepwise and plain fine-tuned models of every training seed (``medr2.seeds``), seed by seed."""
    return [f"r2-{mode}" + (f"-s{k}" if k else "") for k in range(cfg.medr2.seeds) for mode in ("stepwise", "plain")]


def names(cfg) -> list[str]:
    """Every name the zoo knows on this profile (Med-R1's cells spelled out)."""
    out = ["base"] + [f"{k}-{m}" for k in ("sft", "sftat", "sftnoise", "grpo", "atgrpo", "grponoise", "atgrponoise") for m in MODES]
    out += r2_names(cfg) + ["medr1-warmup"]
    for by in cfg.medr1.by:
        groups = (data.MODALITIES if by == "modality" else data.QUESTION_TYPES)
        out += [f"medr1-{by.replace('_', '-')}-{m}-{slug(g)}" for m in ("sft", "grpo") for g in groups]
    return out


# ----------------------------------------------------------------------------- keys, runs, loading
def key(name: str, cfg) -> dict | str:
    """What model ``name`` depends on, its parents' keys included (a checkpoint path for ``base`` from one)."""
    s = spec(name, cfg)
    if s.path is not None:
        return str(s.path)
    if s.alias:
        return key(s.alias, cfg)
    return {**s.key, "parent": key(s.parent, cfg) if s.parent else None}


def run_dir(name: str, cfg) -> Path:
    """Where model ``name`` of this profile is (or will be) trained."""
    s = spec(name, cfg)
    if s.alias:
        return run_dir(s.alias, cfg)
    return cfg.models_dir / name


def fingerprint(name: str, cfg) -> str:
    """A short id of model ``name``'s key: evaluation records of the model are filed under it."""
    return runs.fingerprint(key(name, cfg))


def is_trained(name: str, cfg) -> bool:
    """Whether model ``name`` is in the cache (a checkpoint always is)."""
    s = spec(name, cfg)
    if s.alias:
        return is_trained(s.alias, cfg)
    return s.path is not None or runs.is_done(run_dir(name, cfg), key(name, cfg))


def ensure(name: str, cfg) -> Path:
    """Train model ``name`` (and its parents) unless the cache has it; returns its model folder."""
    s = spec(name, cfg)
    if s.path is not None:
        return s.path
    if s.alias:
        return ensure(s.alias, cfg)

    def train(run_dir):
        start = load(s.parent, cfg) if s.parent else None
        return s.train(start, run_dir)

    result = runs.cached(run_dir(name, cfg), key(name, cfg), train)
    return run_dir(name, cfg) / result["model"]


def load(name: str | Path, cfg, *, device=None):
    """Model ``name`` (a zoo name, or a directory holding a saved VLM or a checkpoint), trained
    through the cache when missing; a fresh copy from disk each call, on ``device`` (default: the
    profile's ``device``), with the profile's ``model.attn_implementation``."""
    device = device or cfg.device
    path = Path(str(name))
    if not (isinstance(name, Path) or (path.is_dir() and not _is_name(str(name)))):
        path = ensure(str(name), cfg)
    return models.load_vlm(path, device=device, image_size=cfg.data.image_size,
                           attn_implementation=cfg.model.attn_implementation)


class Lazy:
    """Model ``name`` loaded (``load``) on first use: a run whose results are all in its records never loads it."""

    def __init__(self, name, cfg):
        self._name, self._cfg, self._vlm = name, cfg, None

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._vlm is None:
            self._vlm = load(self._name, self._cfg)
        return getattr(self._vlm, attr)


def _is_name(name: str) -> bool:
    return name in _FIXED or any(p.fullmatch(name) for p, _ in _PATTERNS)


def background(names_: list[str], cfg, *, threads: int = 1):
    """Train models in another process (``workbook.background``); returns its future. The models
    are cached, so ``load`` reads them back afterwards."""
    from .workbook import background as bg

    return bg(_ensure_all, list(names_), cfg.model_dump(), threads=threads)


def _ensure_all(names_: list[str], cfg_dump: dict) -> None:
    from .config import Config

    cfg = Config.model_validate(cfg_dump)
    for n in names_:
        ensure(n, cfg)
