"""The typed, nested configuration: one dataclass-like block per part of the workbook, loaded from profiles.

The defaults below ARE the embedded default (profile ``tiny``: the generated benchmark and the tiny
model on a 2-core CPU). A profile in ``configs/<name>.yaml`` holds only what differs from them,
nested like the classes here (``sft: {think: {steps: 20}}``); overrides name a key by its dotted
path (``attack.eps=4``). Every value is validated by pydantic: an unknown or mistyped key, a value
of the wrong type or out of range is a :class:`ConfigError` naming the key (and the profile file).

Units, the same everywhere: an L-inf attack radius or step (``eps``, ``alpha``) is in 1/255 of the
pixel range (8 means 8/255); an L2 radius is the L2 norm of the perturbation of pixels in [0, 1].
Learning rates are peak rates; steps are optimizer steps; item counts of 0 mean "all".

    cfg = config.load("smoke", {"attack.eps": 4})
    cfg.sft.nothink.steps, cfg.attack.eps
    python -m safemed_lib config --profile tiny --set attack.eps=4   # prints the resolved profile
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .paths import PROJECT_ROOT, resolve
from .yamlconf import ConfigError, keys, load_file, parse_overrides  # noqa: F401  (re-exported)

CONFIGS = PROJECT_ROOT / "configs"

PosInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]          # an item count; 0 means "all"
PosFloat = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(gt=0, le=1)]
Mode = Literal["think", "nothink", "think_after"]
Norm = Literal["linf", "l2"]


class Block(BaseModel):
    """A configuration block: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------- data and model
class Data(Block):
    omnimedvqa_root: str | None = None  # a local OmniMedVQA copy (paper profile); None: the embedded benchmark
    bench_dir: str | None = None        # where the embedded benchmark is generated; None: data/bench/<profile>
    n_images: PosInt = 1600             # images of the embedded benchmark (5 questions each on average)
    image_size: Annotated[int, Field(ge=28, multiple_of=28)] = 112  # square side in pixels, on Qwen2-VL's 28-pixel grid
    test_frac: Annotated[float, Field(gt=0, lt=1)] = 0.2  # share of images in the test split (per image)


class TinyBase(Block):
    """The tiny Qwen2-VL built here when ``model.path`` is None, and what it is pretrained on (``safemed_lib.base``)."""

    hidden_size: PosInt = 128       # width of the language model (the vision tower matches it)
    layers: PosInt = 2              # language-model layers
    copy_steps: Count = 400         # in-context copy pretraining on random token sequences (0: none)
    vision_steps: Count = 2000      # vision-tower pretraining on the images' scene attributes (0: none)
    position_weight: NonNeg = 1.0   # weight of its per-token row/column loss
    pretrain_images: Count = 3      # extra generated images it also sees, x the benchmark's image count (0: none)
    pretrain_seed_offset: int = 7   # their generator seed is the benchmark's seed + this


class Model(Block):
    path: str | None = None      # a local Qwen2-VL / Qwen2.5-VL checkpoint; None: the tiny model built here
    dir: str | None = None       # where trained models are cached; None: data/models/<profile>
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None  # None: transformers' default
    tiny: TinyBase = TinyBase()


# ----------------------------------------------------------------------------- SFT
class Binding(Block):
    """Auxiliary terms of answer-only SFT (``safemed_lib.binding``): weights >= 0 of each term."""

    match: NonNeg = 1.0      # which option's tokens match the answer (from the option binding layer)
    letter: NonNeg = 1.0     # the letter read from the matching option
    attention: NonNeg = 1.0  # last-layer attention from the answer position onto the right option
    content: NonNeg = 0.0    # a content head scores the options from the answer position
    scene: NonNeg = 0.0      # one head per scene attribute names what the image shows
    layer: PosInt = 1        # the layer whose output the match term reads (below the last)
    head: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] = 0  # supervised last-layer head(s)


class SFTRecipe(Block):
    """One supervised fine-tuning run (AdamW, linear warm-up over 5% then cosine to 0, clip 1.0)."""

    steps: PosInt = 2500
    lr: PosFloat = 1e-3              # peak learning rate
    batch_size: PosInt = 16          # questions per step
    weight_decay: NonNeg = 0.0       # AdamW weight decay
    train_vision: bool = True        # train the vision tower too (False: it stays as pretraining left it)
    binding: Binding | None = None   # auxiliary terms (answer-only only); None: none; true: the defaults
    noise_sigma: NonNeg = 0.0        # std of Gaussian noise added to every training image, pixels in [0, 1] (0: none)
    format_only: bool = False        # teach the completion's form only: the letter's target is uniform over the
                                     # options, think targets carry one fixed rationale (knows the format, not the task)
    threads: PosInt | None = None    # torch threads while training (None: the profile's); not part of the cache key

    def key(self) -> dict:
        """The fields that identify a run: ``threads`` aside, ``noise_sigma`` and ``format_only`` only when set."""
        unset = {k for k in ("noise_sigma", "format_only") if not getattr(self, k)}
        return self.model_dump(exclude={"threads"} | unset)

    @field_validator("binding", mode="before")
    @classmethod
    def _binding_bool(cls, v):
        return {} if v is True else None if v is False else v


class SFT(Block):
    """The standard fine-tuned baselines (notebook 02); every notebook that loads SFT names these runs."""

    think: SFTRecipe = SFTRecipe(train_vision=False)
    nothink: SFTRecipe = SFTRecipe(steps=10000, train_vision=False, binding=Binding(content=1.0, scene=1.0),
                                   threads=2, weight_decay=0.3)
    workers: PosInt = 1  # variants trained at the same time, one process each (1: one after the other)


class Eval(Block):
    """Clean evaluation (notebook 02 and ``python -m safemed_lib eval``)."""

    n: Count = 0                  # test questions (0: all)
    batch_size: PosInt = 32
    max_new_tokens: PosInt = 96   # generation budget of think answers


# ----------------------------------------------------------------------------- attacks
class Attack(Block):
    """SafeMed-R1's collapse of the fine-tuned baselines under PGD (notebook 03)."""

    models: list[str] = ["sft-nothink", "sft-think"]
    n_items: PosInt = 128           # test questions attacked at the headline radius (a seeded sample)
    n_sweep: PosInt = 48            # the first of them, attacked at every radius of the sweep
    steps: PosInt = 10              # PGD steps (step size 2.5 eps / steps)
    eps: PosFloat = 8               # the headline L-inf radius, 1/255
    linf_eps: list[PosFloat] = [1, 2, 4, 8, 16]   # the sweep's L-inf radii, 1/255
    l2_eps: list[PosFloat] = [0.25, 0.5, 1.0]     # the sweep's L2 radii (matched to smoothing's)
    restarts: PosInt = 1            # PGD random restarts (the worst case per question is kept)
    batch_size: PosInt = 16
    max_new_tokens: PosInt = 96


class Viz(Block):
    """The attack visualizer (notebook 08)."""

    models: list[str] = ["sft-think", "sft-nothink"]
    n_items: PosInt = 6         # benchmark questions shown (real images from installed packages are added)
    norm: Norm = "linf"
    eps: PosFloat = 8           # L-inf: 1/255; L2: radius
    steps: PosInt = 10
    max_new_tokens: PosInt = 96


# ----------------------------------------------------------------------------- GRPO
class GRPORecipe(Block):
    """One GRPO run (Med-R1): G completions per question, format + accuracy rewards, k3 KL to the start."""

    steps: PosInt = 20
    lr: PosFloat = 1e-4
    batch_size: PosInt = 8         # completions per step (batch_size / num_generations questions)
    num_generations: Annotated[int, Field(ge=2)] = 4   # G, the group size (Med-R1: 4)
    beta: NonNeg = 0.04            # KL weight (Med-R1: 0.04)
    temperature: PosFloat = 1.0    # sampling temperature (Med-R1: 1)
    max_completion_length: PosInt = 96   # tokens per completion (also the evaluation's generation budget)
    noise_sigma: NonNeg = 0.0      # std of Gaussian noise on every rollout's image, pixels in [0, 1] (0: none)
    noise_draw: Literal["rollout", "group"] = "rollout"  # a draw per rollout, or one per question's group

    def key(self) -> dict:
        """The fields that identify a run (the noise's only when set, so older runs keep their keys)."""
        return self.model_dump(exclude=set() if self.noise_sigma else {"noise_sigma", "noise_draw"})


class GRPOByMode(Block):
    """The GRPO recipe of each prompt form (think completions are longer)."""

    think: GRPORecipe = GRPORecipe(steps=100, lr=3e-5, batch_size=16, max_completion_length=80)
    nothink: GRPORecipe = GRPORecipe(steps=100, lr=3e-5, batch_size=16, max_completion_length=12)


class TrainAttack(Block):
    """The PGD attack of adversarial training (AT-GRPO and AT-SFT share it)."""

    eps: PosFloat = 8          # L-inf radius, 1/255
    alpha: PosFloat = 2        # PGD step, 1/255
    steps: PosInt = 5          # PGD steps per batch
    fraction: Share = 0.5      # share of each batch's questions attacked
    ramp_steps: Count = 10     # AT-GRPO: eps ramps up linearly over the first optimizer steps (0: none)

    def pixels(self) -> dict:
        """The attack as the trainers take it: eps and alpha in [0, 1] pixel units, steps, fraction."""
        return {"eps": self.eps / 255, "alpha": self.alpha / 255, "steps": self.steps, "fraction": self.fraction}


class ATSFT(SFTRecipe):
    """Madry-style adversarial fine-tuning from SFT with the same training attack (AT-SFT rows)."""

    modes: list[Literal["think", "nothink"]] = ["think"]   # [] skips AT-SFT
    steps: PosInt = 500
    lr: PosFloat = 3e-4
    background: bool = True    # train in its own process while GRPO trains (2 CPU cores; false on one GPU)

    def recipe(self) -> SFTRecipe:
        return SFTRecipe(**self.model_dump(exclude={"modes", "background"}))


class RobustEval(Block):
    """The robustness table's evaluation: PGD on the reference answer (8-bit rounded) on ``n`` test
    questions; beside it, on the first ``suite_n`` of them, other objectives, a stronger attack
    and eps curves, with the gradient-masking checks of Carlini et al. 2019."""

    n: Count = 160             # test questions per model (0: all)
    eps: PosFloat = 8          # L-inf radius, 1/255
    alpha: PosFloat = 2        # PGD step, 1/255
    steps: PosInt = 10
    batch_size: PosInt = 32
    suite_n: Count = 8         # questions of the attack suite, the table's first (0: none); tiny_eval.yaml: more
    strong_steps: PosInt = 50  # the strong attack: PGD steps (step 2.5 eps / steps) ...
    strong_restarts: PosInt = 5  # ... and random starts, the worst per question
    linf_curve: list[PosFloat] = [1, 2, 4, 16, 64]   # eps curve, L-inf radii in 1/255 (eps is added); 64: about chance
    l2_curve: list[PosFloat] = [0.25, 0.5, 1.0]      # eps curve, L2 radii in [0, 1] pixel units


class SafeMed(Block):
    """SafeMed-R1's robustness table: SFT, GRPO, AT-GRPO and AT-SFT, think and nothink (notebook 05)."""

    modes: list[Literal["think", "nothink"]] = ["think", "nothink"]
    grpo: GRPOByMode = GRPOByMode()     # GRPO and AT-GRPO alike
    train_attack: TrainAttack = TrainAttack()
    at_sft: ATSFT = ATSFT()
    eval: RobustEval = RobustEval()


class Warmup(Block):
    """The generalization protocol's base for a model without pretraining: SFT on a small general split."""

    items: Count = 1024       # training questions drawn across all groups
    steps: Count = 800        # 0: the base itself (as with a pretrained checkpoint)
    lr: NonNeg = 3e-3
    batch_size: PosInt = 16
    format_only: bool = False # teach the answer format only, never an answer (SFTRecipe.format_only)


class MedR1(Block):
    """Med-R1's cross-modality (8x8) and cross-question-type (5x5) protocols (notebook 04)."""

    mode: Mode = "think"
    by: list[Literal["modality", "question_type"]] = ["modality", "question_type"]
    warmup: Warmup = Warmup()
    sft: SFTRecipe = SFTRecipe(steps=20, lr=3e-4, batch_size=8)    # each cell's SFT model
    grpo: GRPORecipe = GRPORecipe()                                 # each cell's GRPO model (same steps)
    eval_n: Count = 0                       # test questions evaluated per model (0: all)
    eval_batch_size: PosInt = 64
    background: bool = True                 # later protocols train in their own process (false on one GPU)


# ----------------------------------------------------------------------------- certification
class NoiseSFT(SFTRecipe):
    """Gaussian-noise fine-tuning from SFT (Cohen et al.'s base classifier training): ``sftnoise-<mode>``."""

    steps: PosInt = 1000
    lr: PosFloat = 3e-4
    noise_sigma: NonNeg = 0.25
    train_vision: bool = True

    def recipe(self) -> SFTRecipe:
        return SFTRecipe(**self.model_dump())


class NoiseGRPO(Block):
    """GRPO under Gaussian noise from SFT (``grponoise-<mode>``; with the training attack ``atgrponoise-<mode>``):
    ``safemed.grpo.<mode>``'s recipe with these fields replaced (by default the budget of ``noise_sft``)."""

    noise_sigma: PosFloat = 0.25   # std of the noise on every rollout's image, pixels in [0, 1]
    noise_draw: Literal["rollout", "group"] = "rollout"  # a draw per rollout, or one per question's group
    steps: PosInt = 1000
    lr: PosFloat = 3e-4

    def recipe(self, base: GRPORecipe) -> GRPORecipe:
        return base.model_copy(update=self.model_dump())


class SmoothAttack(Block):
    """SmoothAdv (Salman et al. 2019) on the smoothed answer-only models: soundness of the certificates seen."""

    items: Count = 50        # the first certified questions attacked per model (0: none)
    sigma: PosFloat = 0.25   # the noise level attacked (one of certify.sigmas)
    radii: list[PosFloat] = [0.25, 0.5]  # L2 radii of the attack, pixels in [0, 1]
    steps: PosInt = 10       # PGD steps
    m: PosInt = 8            # noise draws averaged per step
    n: PosInt = 100          # PREDICT's samples at the attacked image (alpha = certify.alpha)


class Certify(Block):
    """Randomized smoothing (Cohen et al.'s CERTIFY) of the VLM's answer (notebook 06)."""

    models: list[str] = ["sft-nothink", "sftnoise-nothink", "sft-think", "atgrpo-nothink", "atgrpo-think"]
    sigmas: list[PosFloat] = [0.25, 0.5]   # noise std, pixels in [0, 1] (tiny_eval adds 0.12)
    radii: list[NonNeg] = [0.25, 0.5, 1.0]       # L2 radii of the table
    n0: PosInt = 16          # samples that select the class
    n: PosInt = 1000         # samples that bound its probability, answer-only models (max radius 2.46 sigma)
    n_think: PosInt = 100    # the same for think models (each sample is a generation; max radius 1.5 sigma)
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.001  # failure probability of each certificate
    n_items: PosInt = 100    # test questions per answer-only model (balanced over modalities)
    n_items_think: PosInt = 6  # think models: a generation per sample; the full size is configs/tiny_eval.yaml's
    min_group_items: PosInt = 10  # per-modality rows and curves only for modalities with at least this many items
    batch_size: PosInt = 32
    fast_path: bool = True   # answer-only models: option-letter log-probs instead of generation
    noise: Literal["embedding", "pixel"] = "embedding"  # fast path: draw the noise in the patch embedding (same law)
    max_new_tokens: PosInt = 96
    background: bool = True  # certify about half of the models in a second process (false on one GPU)
    attack: SmoothAttack = SmoothAttack()
    noise_sft: NoiseSFT = NoiseSFT()   # the sftnoise-<mode> models (binding: as the SFT model of the mode, below)
    noise_grpo: NoiseGRPO = NoiseGRPO()  # the grponoise-/atgrponoise-<mode> models

    @model_validator(mode="after")
    def _attack_sigma_is_certified(self):
        if self.attack.items and self.attack.sigma not in self.sigmas:
            raise ValueError(f"certify.attack.sigma={self.attack.sigma} is not one of certify.sigmas={self.sigmas}: "
                             f"the attack reads that sigma's certificates (or set certify.attack.items: 0)")
        return self


# ----------------------------------------------------------------------------- Med-R2
class MedR2(Block):
    """The Med-R2-style stepwise benchmark (notebook 07)."""

    models: list[str] = ["sft-nothink", "sft-think", "atgrpo-nothink", "atgrpo-think"]
    stepwise_json: str | None = None   # a stepwise JSON file (e.g. a converted Med-R2 release); None: generate
    image_root: str | None = None      # the folder stepwise_json's image paths are relative to
    n_images: Count = 2400             # generated benchmark the cases come from (0: data.n_images; else its own seed)
    n_cases: PosInt = 256              # test cases evaluated, at most (4 stage questions each)
    n_cases_think: PosInt = 64         # test cases for think models (greedy generation)
    n_cases_attack: Count = 16         # of those, the first n also run under PGD
    cues: list[str] = ["neutral", "hint_right", "hint_wrong", "context_wrong", "authority_wrong", "box_true",
                       "box_wrong", "coords_true", "coords_wrong"]
    pgd_eps: PosFloat = 4              # L-inf radius, 1/255
    pgd_steps: Count = 5               # 0: no PGD conditions
    pgd_cues: list[str | None] = [None, "box_true"]   # cues combined with PGD (None: PGD alone)
    # stepwise and plain fine-tuning from SFT-nothink: the tower fixed (cached image embeddings) and the
    # answer-only SFT's binding terms, which the long options of localization / finding need; steps and
    # lr (peak of the cosine schedule) chosen on validation cases (scripts/r2_budget.py)
    ft: SFTRecipe = SFTRecipe(steps=1500, lr=2e-3, batch_size=16, train_vision=False,
                              binding=Binding(content=1.0, scene=1.0))
    seeds: PosInt = 1                  # training seeds of each (zoo r2-<mode>, r2-<mode>-s1, ...)
    background: bool = True            # plain models train, every other model runs, in a second process (false on one GPU)
    fast_path: bool = True             # answer-only models: letter log-probs instead of generation
    batch_size: PosInt = 32
    max_new_tokens: PosInt = 96


# ----------------------------------------------------------------------------- the whole configuration
class Config(Block):
    """The whole workbook's configuration (one profile, after overrides)."""

    profile: str = "tiny"
    seed: Count = 0                     # data split, benchmark generation, training and attack seeds
    threads: PosInt = 1                 # torch threads (two threads on 2 busy cores can run 10-25x slower)
    device: str = "cpu"                 # where loaded models go ("cpu", "cuda")
    data: Data = Data()
    model: Model = Model()
    sft: SFT = SFT()
    eval: Eval = Eval()
    attack: Attack = Attack()
    viz: Viz = Viz()
    medr1: MedR1 = MedR1()
    safemed: SafeMed = SafeMed()
    certify: Certify = Certify()
    medr2: MedR2 = MedR2()

    @property
    def bench_dir(self) -> Path:
        return resolve(self.data.bench_dir or f"data/bench/{self.profile}")

    @property
    def models_dir(self) -> Path:
        return resolve(self.model.dir or f"data/models/{self.profile}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# ----------------------------------------------------------------------------- loading
def profile_path(profile: str | Path) -> Path:
    """``configs/<name>.yaml`` for a bare name, else the path itself."""
    path = Path(profile)
    if not path.suffix:
        path = CONFIGS / f"{profile}.yaml"
    path = resolve(path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise ConfigError(f"profile {str(profile)!r}: no file {path} (known profiles: {known})")
    return path


def load(profile: str | Path = "tiny", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """The configuration of ``profile`` (a name in ``configs/`` or a YAML path) with ``overrides``
    (``{"attack.eps": 4}`` or ``["attack.eps=4"]``) applied; raises :class:`ConfigError` naming
    the file and the key for anything that does not fit."""
    path = profile_path(profile)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    return load_file(Config, path, overrides, defaults=Config().model_dump(), setdefault={"profile": path.stem})
