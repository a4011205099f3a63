"""AT-GRPO (at_grpo.py): the adversarial settings and schedule, and ATGRPOTrainer's hooks on TRL's GRPOTrainer.

The model is the tiny Qwen2-VL-architecture model at 56x56 on toy images, warmed up with a few
SFT steps (no-think targets) so that GRPO's rollouts sometimes match the format. The hook tests
fail loudly if TRL stops calling the overridden private methods, if the policy-gradient loss does
not see the attacked images, or if the copies of a question in its group see different images.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from trl import GRPOTrainer

from safemed_lib import at_grpo, data, grpo, models
from safemed_lib.config import GRPORecipe
from toy import SIZE, warm_toy_model
from twoproc import torchrun

EPS = 8 / 255


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(items, a warmed-up model saved on disk): load a fresh copy per test with _fresh()."""
    return warm_toy_model(tmp_path_factory.mktemp("atgrpo"))


def _fresh(toy):
    return models.load_vlm(toy[1], image_size=SIZE)


# --------------------------------------------------------------------------- settings and schedule
def test_adversarial_schedule_and_validation():
    cfg = at_grpo.AdversarialConfig(eps=8 / 255, alpha=2 / 255, clean_steps=2, ramp_steps=4)
    assert cfg.schedule(0) == (0.0, 2 / 255) and cfg.schedule(1)[0] == 0.0
    eps = [cfg.schedule(s)[0] for s in range(2, 8)]
    assert eps == pytest.approx([8 / 255 * k / 4 for k in (1, 2, 3, 4)] + [8 / 255] * 2)
    assert cfg.schedule(3)[1] == pytest.approx(1 / 255)  # alpha ramps with eps
    assert at_grpo.as_adversarial({"eps": 0.01, "fraction": 1.0}).fraction == 1.0
    assert at_grpo.as_adversarial(None) is None and at_grpo.as_adversarial(cfg) is cfg
    for bad in ({"norm": "l1"}, {"fraction": 1.5}, {"steps": 0}, {"eps": -1.0}, {"target": "x"}):
        with pytest.raises(ValueError):
            at_grpo.AdversarialConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        at_grpo.as_adversarial({"epsilon": 0.1})


# --------------------------------------------------------------------------- the trainer's hooks
class _Spy(at_grpo.ATGRPOTrainer):
    """Records the pixel values the policy-gradient loss sees."""

    seen: list = []

    def _compute_loss(self, model, inputs):
        _Spy.seen.append((inputs["pixel_values"].detach().clone(), inputs["image_grid_thw"].clone()))
        return super()._compute_loss(model, inputs)


def _at_trainer(vlm, items, out_dir, cls=at_grpo.ATGRPOTrainer, **adv):
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0, temperature=1.0,
                        max_completion_length=6)
    cfg = grpo.grpo_config(out_dir, recipe, seed=0, device="cpu", save_steps=10)
    return cls(model=vlm.model, reward_funcs=grpo.reward_funcs("nothink"), args=cfg,
               train_dataset=grpo.build_dataset(items, "nothink", SIZE), processing_class=vlm.processor,
               vlm=vlm, items=items, mode="nothink",
               adversarial=at_grpo.AdversarialConfig(**{"eps": EPS, "alpha": 2 / 255, "steps": 2, **adv}))


def test_at_grpo_hook_is_called_and_loss_sees_adversarial_pixels(toy, tmp_path):
    """Fails loudly if TRL stops calling the overridden private hooks, or if the images the
    policy-gradient loss sees are not the attacked ones."""
    items = toy[0]
    vlm = _fresh(toy)
    _Spy.seen = []
    trainer = _at_trainer(vlm, items, tmp_path, cls=_Spy, fraction=1.0)
    trainer.train()
    assert trainer.hook_calls == {"generate_and_score": 1, "calculate_rewards": 1}, trainer.hook_calls
    assert trainer.attacked_images == 2  # 8 completions = 2 questions x 4, all attacked
    (pv, grid), = _Spy.seen
    # every image in the loss batch differs from its clean version, by at most eps in pixel space
    clean_pv = {}
    for q, it in trainer.items.items():
        clean_pv[q] = vlm.preprocess(data.load_image(it.image_path, SIZE)[None])[0]
    rows = pv.split([int(g.prod()) for g in grid])
    std = torch.tensor(vlm.processor.image_processor.image_std).repeat_interleave(2 * 14 * 14)
    for r in rows:
        diffs = {q: ((r - c) * std).abs().max().item() for q, c in clean_pv.items() if c.shape == r.shape}
        q, d = min(diffs.items(), key=lambda kv: kv[1])
        assert 0 < d <= EPS + 1e-5, (q, d)
    m = trainer.state.log_history[0]
    assert m["adv/fraction"] == 1.0 and m["rewards/adversarial"] is not None
    assert m["adv/loss_adv"] > m["adv/loss_start"]  # PGD raised the answer NLL (from its own trace)


def test_at_grpo_fails_loudly_when_hook_is_bypassed(toy, tmp_path, monkeypatch):
    """Simulates a TRL release that no longer routes generation through the overridden method."""
    items = toy[0]
    orig = GRPOTrainer._prepare_inputs

    def renamed(self, generation_batch):  # what a refactor would look like from our side
        self._generate_and_score_completions = lambda b: GRPOTrainer._generate_and_score_completions(self, b)
        self._calculate_rewards = lambda *a: GRPOTrainer._calculate_rewards(self, *a)
        return orig(self, generation_batch)

    monkeypatch.setattr(GRPOTrainer, "_prepare_inputs", renamed)
    trainer = _at_trainer(_fresh(toy), items, tmp_path, fraction=1.0)
    with pytest.raises(RuntimeError, match="did not call the hooks"):
        trainer.train()


def test_perturb_same_image_per_question_deterministic_and_in_ball(toy, tmp_path):
    items = toy[0]
    vlm = _fresh(toy)
    trainer = _at_trainer(vlm, items, tmp_path, fraction=0.5)
    trainer.model.train()
    ds = grpo.build_dataset(items, "nothink", SIZE)
    rows = [ds[i] for i in range(len(items)) for _ in range(4)]  # groups of 4 copies
    out1 = trainer._perturb(copy.deepcopy(rows))
    flags1 = list(trainer._adv_flags)
    out2 = trainer._perturb(copy.deepcopy(rows))
    assert flags1 == trainer._adv_flags and 0 < sum(flags1) < len(rows)
    # as a process whose peers attack more questions: padded work, the same real images and counts
    n = trainer.attacked_images
    trainer._agreed_count = lambda k: k + 2
    out3 = trainer._perturb(copy.deepcopy(rows))
    assert trainer._adv_flags == flags1 and trainer.attacked_images - n == len({r["question_id"] for r, f in
                                                                               zip(rows, flags1) if f})
    for o1, o3 in zip(out1, out3):
        assert (data.from_pil(o1["image"]) - data.from_pil(o3["image"])).abs().max() <= 2 / 255 + 1e-6
    by_q: dict[str, list] = {}
    for r, o1, o2, f in zip(rows, out1, out2, flags1):
        a, b, clean = data.from_pil(o1["image"]), data.from_pil(o2["image"]), data.from_pil(r["image"])
        assert torch.equal(a, b)  # deterministic in (seed, step, question)
        by_q.setdefault(r["question_id"], []).append(a)
        delta = (a - clean).abs().max().item()
        assert (0 < delta <= EPS + 1e-6) if f else delta == 0
    for imgs in by_q.values():  # every copy of a question carries the same image
        assert all(torch.equal(imgs[0], im) for im in imgs)


def test_attack_costs_pgd_passes_plus_one_and_measures_success_every_n_steps(toy, tmp_path):
    """The attack's logged losses come from PGD's own trace (one forward pass beyond PGD's, where
    two extra passes were spent before), and the success rate's generations run every
    ``success_every`` steps only (every step before)."""
    items = toy[0]
    vlm = _fresh(toy)
    trainer = _at_trainer(vlm, items, tmp_path, fraction=1.0, success_every=3)
    trainer.model.train()
    ds = grpo.build_dataset(items[:2], "nothink", SIZE)
    rows = [ds[i] for i in range(2) for _ in range(4)]
    calls = {"forward": 0, "generate": 0}
    vlm.model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    real_generate = vlm.generate
    vlm.generate = lambda *a, **k: calls.__setitem__("generate", calls["generate"] + 1) or real_generate(*a, **k)
    per_step = []
    for step in range(4):
        trainer.state.global_step = step
        before = dict(calls)
        trainer._perturb(copy.deepcopy(rows))
        per_step.append({k: calls[k] - before[k] for k in calls})
    measured = [s for s, c in enumerate(per_step) if c["generate"]]
    assert measured == [0, 3]  # clean + adversarial generation on measured steps only (nothink: no clean target)
    assert all(c["generate"] == 2 for c in per_step if c["generate"])
    quiet = [c for c in per_step if not c["generate"]]
    assert quiet and all(c["forward"] == 2 + 1 for c in quiet)  # 2 PGD steps + the final iterate's loss
    assert len(trainer._pending_metrics["adv/loss_start"]) == 4 and "adv/loss_clean" not in trainer._pending_metrics


def test_groups_without_reward_spread_are_counted_per_kind(toy, tmp_path, monkeypatch):
    """A group whose G rewards are all equal gives GRPO no gradient: its share is logged for the
    clean and the attacked groups apart."""
    trainer = _at_trainer(_fresh(toy), toy[0], tmp_path, fraction=1.0)
    trainer.model.train()
    # 2 groups of 4 (reward funcs: format, accuracy): the clean one has spread, the attacked one none
    rewards = torch.tensor([[1., 1.], [1., 0.], [0., 0.], [1., 0.], [1., 0.], [1., 0.], [1., 0.], [1., 0.]])
    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards", lambda self, *a: rewards.clone())
    trainer._adv_flags = [False] * 4 + [True] * 4
    trainer._calculate_rewards([{}] * 8, None, None, None)
    m = trainer._metrics["train"]
    assert m["rewards/clean_frac_zero_std"] == [0.0] and m["rewards/adversarial_frac_zero_std"] == [1.0]
    assert m["rewards/clean"] == [pytest.approx(1.0)] and m["rewards/adversarial"] == [pytest.approx(1.0)]


@pytest.mark.parametrize("target", ["first_token", "margin"])
def test_perturb_with_the_other_objectives(toy, tmp_path, target):
    """The training attack takes attacks.attack_loss's objectives too (the first token needs the clean images)."""
    items = toy[0]
    trainer = _at_trainer(_fresh(toy), items, tmp_path, fraction=1.0, target=target, measure_success=False)
    ds = grpo.build_dataset(items, "nothink", SIZE)
    rows = [ds[i] for i in range(2)]
    out = trainer._perturb(copy.deepcopy(rows))
    for r, o in zip(rows, out):
        assert 0 < (data.from_pil(o["image"]) - data.from_pil(r["image"])).abs().max().item() <= EPS + 1e-6


def test_train_grpo_with_adversarial_uses_the_at_trainer(toy, tmp_path):
    """grpo.train_grpo with an ``adversarial`` dict (pixel units) trains AT-GRPO: the attack's columns are logged."""
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0, max_completion_length=6)
    vlm = grpo.train_grpo(_fresh(toy), toy[0], recipe, mode="nothink", out_dir=tmp_path / "at",
                          adversarial={"eps": EPS, "alpha": 2 / 255, "steps": 1, "fraction": 1.0})
    assert vlm.train_info["trainer"] == "ATGRPOTrainer" and vlm.train_info["attacked_images"] == 2
    log = grpo.read_log(tmp_path / "at")
    assert log["adv_eps"].iloc[-1] == pytest.approx(EPS) and log["adv_fraction"].iloc[-1] == 1.0


# --------------------------------------------------------------------------- distributed (slow)
@pytest.mark.slow
def test_at_grpo_two_processes_one_attacking_rank_finishes(tmp_path):
    """2 CPU processes, only rank 0 has questions to attack, every forward pass a collective (as
    under ZeRO-3/FSDP): the attack's work must be the same on both ranks, or this hangs."""
    torchrun("at_grpo_two_ranks.py", tmp_path, port=29543)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # the same forward passes on both ranks
    # padding is not an attack: rank 0 attacked its 2 questions, rank 1 none; 1.0 and 0.0 average to 0.5
    assert [r["attacked_images"] for r in ranks] == [2, 0]
    log = grpo.read_log(tmp_path / "run")
    assert log["adv_fraction"].tolist() == [0.5]
