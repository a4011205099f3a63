"""SafeMed-R1's AT-GRPO: GRPO whose generation batches carry PGD adversarial images against the current policy.

:class:`ATGRPOTrainer` (used by ``grpo.train_grpo`` when given an ``adversarial`` setting): before
the rollouts of every generation batch, a fraction of the questions get their image replaced by a
PGD adversarial image computed against the CURRENT policy (the teacher-forced NLL of the reference
answer, :func:`attacks.attack_loss`, through the model wrapper's exact differentiable
preprocessing). Rollouts, rewards and the policy-gradient loss of those questions then all use the
perturbed image. The images reach TRL as PIL images, so the adversarial image is rounded to the
8-bit grid first (:func:`attacks.round_8bit_toward`): for an L-inf budget that is a multiple of
1/255 the rounded image stays inside the eps-ball, because the clean image is itself on the grid.
Which questions are attacked, and the random start of PGD, are a pure function of (seed, step,
question ids), so every copy of a question in its group, on any process, sees the same image.

Distributed training: under ZeRO-3 / FSDP every forward pass of the policy is a collective, so
every process must run the same attack work even when its batch has fewer (or no) questions to
attack. The processes agree on the largest count, and the others pad with copies of one of their
own questions (results discarded, never logged or counted). The attack runs inside TRL's own
generation context (``trl.models.unwrap_model_for_generation`` + FSDP1's ``summon_full_params``),
as TRL's rollouts do.

The hook: ``GRPOTrainer._generate_and_score_completions`` (a private method; TRL is pinned to
1.16.0 in pyproject.toml). ``ATGRPOTrainer`` also wraps ``_calculate_rewards`` to log clean and
adversarial rewards separately, and raises at the first training step if either hook was not
called (a TRL upgrade that renames them fails loudly instead of silently training without attacks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import trl
from trl.models import unwrap_model_for_generation

from . import attacks, data, prompts
from .grpo_noise import NoisyGRPOTrainer

TRL_VERSION = "1.16.0"  # the version whose private hooks ATGRPOTrainer overrides
if trl.__version__ != TRL_VERSION:
    warnings.warn(f"safemed_lib.at_grpo was written against trl=={TRL_VERSION} (found {trl.__version__}); "
                  "ATGRPOTrainer overrides private GRPOTrainer methods and checks at run time that they "
                  "are still called")
MODES = prompts.MODES


# --------------------------------------------------------------------------- adversarial settings
@dataclasses.dataclass
class AdversarialConfig:
    """What ATGRPOTrainer attacks, and how hard.

    eps, alpha: PGD radius and step in [0,1] pixel units (L-inf: 8/255 and 2/255 by default).
    steps: PGD steps per generation batch. norm: "linf" or "l2".
    fraction: share of the questions of each generation batch that get an adversarial image.
    clean_steps: optimizer steps trained clean before the first attack.
    ramp_steps: then eps (and alpha, proportionally) ramp linearly from eps/ramp_steps to eps.
    prompt: the prompt mode of the attack loss (None: the training mode).
    target: what the attack loss scores (``attacks.answer_targets``): "answer" (the reference
        answer block), "clean_reasoning" (the policy's greedy reasoning on the clean image, then
        the reference answer), "auto" (answer for nothink, clean_reasoning otherwise),
        "first_token" (the policy's clean greedy first token) or "margin" (the option letters'
        margin; answer-first prompts): see ``attacks.attack_loss``.
    measure_success: greedy-decode the attacked questions on the clean and the adversarial image
        and log the attack's success rate (correct -> wrong), every ``success_every`` optimizer
        steps (steps 0, N, 2N, ...): it costs a generation on the adversarial image (and, where the
        target does not need one anyway, on the clean image).
    success_every: how often (in optimizer steps, >= 1) the success rate is measured.
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    fraction: float = 0.5
    clean_steps: int = 0
    ramp_steps: int = 0
    random_start: bool = True
    prompt: str | None = None
    target: str = "auto"
    measure_success: bool = True
    success_every: int = 10

    def __post_init__(self):
        if self.norm not in attacks.NORMS:
            raise ValueError(f"adversarial.norm must be one of {attacks.NORMS}, got {self.norm!r}")
        if not (0.0 <= self.fraction <= 1.0):
            raise ValueError(f"adversarial.fraction must be in [0, 1], got {self.fraction}")
        if self.eps < 0 or self.alpha <= 0:
            raise ValueError(f"adversarial needs eps >= 0 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"adversarial.steps must be an integer >= 1, got {self.steps}")
        if int(self.success_every) != self.success_every or self.success_every < 1:
            raise ValueError(f"adversarial.success_every must be an integer >= 1, got {self.success_every}")
        if self.clean_steps < 0 or self.ramp_steps < 0:
            raise ValueError("adversarial.clean_steps and ramp_steps must be >= 0")
        if self.prompt is not None and self.prompt not in MODES:
            raise ValueError(f"adversarial.prompt must be one of {MODES} or None, got {self.prompt!r}")
        if self.target not in attacks.TARGETS:
            raise ValueError(f"adversarial.target must be one of {attacks.TARGETS}, got {self.target!r}")

    def schedule(self, step: int) -> tuple[float, float]:
        """(eps, alpha) at optimizer step ``step`` (0-based): 0 during the clean steps, then a
        linear ramp over ``ramp_steps``, then the full budget."""
        if step < self.clean_steps:
            return 0.0, self.alpha
        k = step - self.clean_steps
        scale = 1.0 if self.ramp_steps == 0 else min(1.0, (k + 1) / self.ramp_steps)
        return self.eps * scale, self.alpha * scale


def as_adversarial(adversarial) -> AdversarialConfig | None:
    """None, an AdversarialConfig, or a dict of its fields (profiles, recipes)."""
    if adversarial is None or isinstance(adversarial, AdversarialConfig):
        return adversarial
    if isinstance(adversarial, dict):
        unknown = set(adversarial) - {f.name for f in dataclasses.fields(AdversarialConfig)}
        if unknown:
            raise ValueError(f"adversarial: unknown keys {sorted(unknown)}")
        return AdversarialConfig(**adversarial)
    raise TypeError(f"adversarial must be None, a dict or an AdversarialConfig, got {type(adversarial).__name__}")


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from ``parts`` (same on every process and every run)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _seed_of(*parts: Any) -> int:
    return int(_unit(*parts) * 2 ** 62)


# --------------------------------------------------------------------------- the adversarial trainer
class ATGRPOTrainer(NoisyGRPOTrainer):
    """``GRPOTrainer`` whose generation batches carry PGD adversarial images (see the module doc).

    Extra arguments: ``vlm`` (the model wrapper whose ``.model`` is the policy being trained; the
    attack runs through it, so it always sees the current weights), ``items`` (the training
    VQAItems, looked up by the dataset's ``question_id``), ``mode`` (the training prompt mode),
    ``adversarial`` (an :class:`AdversarialConfig`), ``attack_seed``; ``noise_sigma`` and
    ``noise_seed`` as :class:`grpo_noise.NoisyGRPOTrainer`'s (Gaussian noise on every rollout's
    image, after the attack).

    Logged per generation batch: ``rewards/clean`` and ``rewards/adversarial`` (total reward of
    the rollouts on clean and on attacked images), the same per reward function,
    ``rewards/clean_frac_zero_std`` / ``rewards/adversarial_frac_zero_std`` (share of clean / attacked
    groups whose G rewards are all equal: they give no gradient; TRL logs ``reward_std`` and
    ``frac_reward_zero_std`` over all groups), ``adv/eps``,
    ``adv/fraction`` (share of rollouts attacked), ``adv/loss_start`` / ``adv/loss_adv`` (the attack
    objective at PGD's start, i.e. the clean image or its random start, and at its last iterate
    before 8-bit rounding, both from the attack's own trace), ``adv/success_rate`` (greedy answers
    flipped from correct to wrong among the attacked questions answered correctly on the clean
    image; every ``success_every`` steps), ``adv/seconds``.
    """

    def __init__(self, *args, vlm, items: Sequence[data.VQAItem], mode: str,
                 adversarial: AdversarialConfig, attack_seed: int = 0, **kwargs):
        super().__init__(*args, vlm=vlm, **kwargs)
        self.items = {it.question_id: it for it in items}
        self.mode = mode
        self.adversarial = as_adversarial(adversarial)
        self.attack_seed = attack_seed
        self.hook_calls = {"generate_and_score": 0, "calculate_rewards": 0}
        self.attacked_images = 0  # adversarial images made so far (for tests and reports)
        self._adv_flags: list[bool] = []
        g = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if g % self.num_generations:
            raise ValueError(
                f"AT-GRPO needs whole groups on each process: per_device_train_batch_size x steps_per_generation "
                f"({g}) must be a multiple of num_generations ({self.num_generations}), so that every "
                "completion of a question is generated from the same adversarial image")

    # -- the hook: perturb the generation batch, then let TRL do the rest on the perturbed images
    def _generate_and_score_completions(self, inputs):
        self.hook_calls["generate_and_score"] += 1
        self._adv_flags = [False] * len(inputs)
        if self.model.training:
            inputs = self._perturb(inputs)
        return super()._generate_and_score_completions(inputs)

    def _perturb(self, inputs: list[dict]) -> list[dict]:
        """The generation batch with the attacked questions' images replaced (sets ``_adv_flags``).

        Every process runs the same attack work (see :meth:`_attack`): the count of attacked
        questions is agreed over processes (the largest), and a process with fewer pads its batch
        with copies of one of its own questions whose results it discards. Padding is never logged
        nor counted as an attacked image."""
        cfg, step = self.adversarial, self.state.global_step
        self._adv_flags = [False] * len(inputs)
        eps, alpha = cfg.schedule(step)
        self._log_metric("adv/eps", eps)
        qids = [row["question_id"] for row in inputs]
        chosen = self.choose(qids, step, eps)
        missing = [q for q in chosen if q not in self.items]
        if missing:
            raise KeyError(f"ATGRPOTrainer: question_id {missing[0]!r} of the training data is not among `items`")
        n_max = self._agreed_count(len(chosen))
        if n_max == 0:
            self._log_metric("adv/fraction", 0.0)
            return inputs
        pad = chosen[0] if chosen else next((q for q in qids if q in self.items), None)
        if pad is None:
            raise KeyError(f"ATGRPOTrainer: no question_id of this batch ({qids[:3]} ...) is among `items`")
        t0 = time.perf_counter()
        first: dict[str, dict] = {}
        for row in inputs:
            first.setdefault(row["question_id"], row)
        work = chosen + [pad] * (n_max - len(chosen))
        x_adv = self._attack(work, [first[q]["image"] for q in work], len(chosen), step, eps, alpha)
        adv_image = {q: data.to_pil(xa) for q, xa in zip(chosen, x_adv.cpu())}
        out = []
        for i, row in enumerate(inputs):
            if row["question_id"] in adv_image:
                row = {**row, "image": adv_image[row["question_id"]]}
                self._adv_flags[i] = True
            out.append(row)
        self.attacked_images += len(chosen)
        self._log_metric("adv/fraction", sum(self._adv_flags) / len(self._adv_flags))
        self._log_metric("adv/seconds", time.perf_counter() - t0)
        return out

    def choose(self, qids: Sequence[str], step: int, eps: float) -> list[str]:
        """The question ids of a batch to attack at ``step`` (sorted, no duplicates): a pure function
        of (attack_seed, step, question id), so the same on every process and every run."""
        if eps <= 0:
            return []
        return sorted({q for q in qids if _unit(self.attack_seed, step, q) < self.adversarial.fraction})

    def _agreed_count(self, n: int) -> int:
        """The largest ``n`` over all processes (one all-gather, called by every process)."""
        if self.accelerator.num_processes == 1:
            return n
        counts = self.accelerator.gather(torch.tensor([n], dtype=torch.long, device=self.accelerator.device))
        return int(counts.max().item())

    @contextlib.contextmanager
    def _policy_for_attack(self):
        """The policy as TRL's own rollouts see it (``GRPOTrainer._generate_single_turn``): unwrapped,
        under ZeRO-3 with its parameters gathered and its hooks removed
        (``args.ds3_gather_for_generation``; otherwise the hooks gather per layer, the same number
        of times on every process since every process runs the same attack work), under FSDP1 the
        root's parameters summoned (FSDP2 needs nothing), gradient checkpointing off. ``vlm.model``
        is that module for the time of the attack, in eval mode (independent examples: no dropout)."""
        unwrap = unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
        with unwrap as unwrapped, self._dist.summon_full_params(self.model_wrapped, recurse=False):
            model, was_training = self.vlm.model, unwrapped.training
            self.vlm.model = unwrapped
            unwrapped.eval()
            try:
                yield unwrapped
            finally:
                unwrapped.train(was_training)
                self.vlm.model = model

    def _attack(self, qids: list[str], images: list, n_real: int, step: int, eps: float, alpha: float):
        """PGD images for ``qids`` (the first ``n_real`` real, the rest padding): the same number of
        generations, forward and backward passes on every process. Metrics from the real ones only."""
        cfg = self.adversarial
        x = torch.stack([data.from_pil(im) for im in images]).to(self.accelerator.device)
        batch = [self.items[q] for q in qids]
        mode = cfg.prompt or self.mode
        n_tokens = self.args.max_completion_length
        with self._policy_for_attack():
            measure = cfg.measure_success and step % cfg.success_every == 0  # the same on every process
            clean_texts = None
            if measure or attacks._resolve_target(cfg.target, mode) == "clean_reasoning":
                clean_texts = self.vlm.generate(x, batch, prompt=mode, max_new_tokens=n_tokens)
            loss_fn, _ = attacks.attack_loss(
                self.vlm, batch, prompt=mode, target=cfg.target, max_new_tokens=n_tokens, clean_images=x,
                clean_outputs=None if clean_texts is None else dict(zip(qids, clean_texts)))
            # per-question random starts: the same image for every copy of a question, on every process
            gens = [torch.Generator(device=x.device).manual_seed(_seed_of(self.attack_seed, step, q)) for q in qids]
            x_adv, trace = attacks.pgd(loss_fn, x, eps=eps, alpha=alpha, steps=cfg.steps, norm=cfg.norm,
                                       random_start=cfg.random_start, generator=gens, return_trace=True)
            # the trainer's processor gets PIL images: put the perturbation on the 8-bit grid by
            # rounding it toward zero, which keeps it inside the eps-ball (L-inf and L2)
            x_adv = attacks.round_8bit_toward(x_adv, x)
            loss_start, loss_adv = trace[0, 0, :n_real], trace[0, -1, :n_real]  # no extra forward passes
            adv_texts = self.vlm.generate(x_adv, batch, prompt=mode, max_new_tokens=n_tokens) if measure else None
        if n_real:
            self._log_metric("adv/loss_start", loss_start.mean().item())
            self._log_metric("adv/loss_adv", loss_adv.mean().item())
            if adv_texts is not None:
                self._log_success(clean_texts[:n_real], adv_texts[:n_real], batch[:n_real])
        return x_adv[:n_real]

    def _log_success(self, clean_texts: list[str], adv_texts: list[str], batch: list) -> None:
        ok_clean = [prompts.parse_answer(t, len(it.options)) == it.answer for t, it in zip(clean_texts, batch)]
        ok_adv = [prompts.parse_answer(t, len(it.options)) == it.answer for t, it in zip(adv_texts, batch)]
        self._log_metric("adv/greedy_acc_clean", float(np.mean(ok_clean)))
        self._log_metric("adv/greedy_acc_adv", float(np.mean(ok_adv)))
        if any(ok_clean):
            flips = sum(c and not a for c, a in zip(ok_clean, ok_adv))
            self._log_metric("adv/success_rate", flips / sum(ok_clean))

    # -- clean vs adversarial rewards (rewards_per_func is gathered over processes: gather the flags too)
    def _calculate_rewards(self, inputs, prompts_, completions, completion_ids_list):
        self.hook_calls["calculate_rewards"] += 1
        rewards_per_func = super()._calculate_rewards(inputs, prompts_, completions, completion_ids_list)
        if not self.model.training:
            return rewards_per_func
        flags = torch.tensor(self._adv_flags or [False] * len(inputs), device=rewards_per_func.device)
        flags = self.accelerator.gather(flags).bool()
        if flags.numel() != rewards_per_func.shape[0]:
            raise RuntimeError(f"ATGRPOTrainer: {flags.numel()} adversarial flags for "
                               f"{rewards_per_func.shape[0]} rewards; TRL's batch layout changed")
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights).nansum(dim=1)
        metrics = self._metrics["train"]
        # groups (G consecutive rollouts of one question) whose rewards are all equal give GRPO no gradient
        group_std = total.view(-1, self.num_generations).std(dim=1)
        group_adv = flags.view(-1, self.num_generations).all(dim=1)
        for name, mask, gmask in (("clean", ~flags, ~group_adv), ("adversarial", flags, group_adv)):
            metrics[f"rewards/{name}"].append(total[mask].mean().item() if mask.any() else math.nan)
            metrics[f"rewards/{name}_frac_zero_std"].append(
                (group_std[gmask] == 0).float().mean().item() if gmask.any() else math.nan)
            for i, fname in enumerate(self.reward_func_names):
                col = rewards_per_func[mask, i]
                metrics[f"rewards/{fname}/{name}"].append(col.nanmean().item() if mask.any() else math.nan)
        return rewards_per_func

    def training_step(self, model, inputs, num_items_in_batch):
        out = super().training_step(model, inputs, num_items_in_batch)
        if self.hook_calls["generate_and_score"] == 0 or self.hook_calls["calculate_rewards"] == 0:
            raise RuntimeError(
                f"ATGRPOTrainer: trl {trl.__version__} did not call the hooks it overrides "
                f"(calls: {self.hook_calls}); the training step ran on CLEAN images. The hooks are private "
                f"GRPOTrainer methods of trl=={TRL_VERSION}: pin that version or port the overrides.")
        return out
