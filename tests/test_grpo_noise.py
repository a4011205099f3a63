"""Gaussian-noise GRPO (grpo_noise.py): the noise every rollout's image carries is the smoothing law
(unclamped, unrounded, one draw per question and step), the generation and the policy-gradient loss
see the same draw, and untagged images are left alone."""
from __future__ import annotations

import pytest
import torch
from trl import GRPOTrainer

from safemed_lib import at_grpo, data, grpo, grpo_noise, models
from safemed_lib.config import GRPORecipe
from toy import SIZE, warm_toy_model

SIGMA = 0.25


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return warm_toy_model(tmp_path_factory.mktemp("noise"))


def _fresh(toy):
    return models.load_vlm(toy[1], image_size=SIZE)



def test_noise_image_processor_replaces_only_tagged_rows_with_the_smoothing_law(toy):
    items, vlm = toy[0], _fresh(toy)
    ims = [data.to_pil(data.load_image(it.image_path, SIZE)) for it in items[:3]]
    proc = vlm.processor
    clean = proc.image_processor(ims, return_tensors="pt")["pixel_values"]
    ip = grpo_noise.NoiseImageProcessor(proc.image_processor, vlm, SIGMA)
    tagged = [ims[0], grpo_noise.tag(ims[1], 11), grpo_noise.tag(ims[2], 12)]
    out = ip(tagged, return_tensors="pt")
    assert ip.noisy_images == 2
    rows = out["pixel_values"].split(out["image_grid_thw"].prod(1).tolist())
    clean_rows = clean.split(out["image_grid_thw"].prod(1).tolist())
    assert torch.equal(rows[0], clean_rows[0])  # untagged: as the processor made it
    for k, seed in ((1, 11), (2, 12)):
        x = data.from_pil(ims[k])
        d = grpo_noise.draw(x.shape, SIGMA, seed)
        torch.testing.assert_close(rows[k], vlm.preprocess((x + d)[None])[0], rtol=0, atol=1e-5)
        # in pixel units the difference to the clean rows is the draw: std sigma, not clamped, not rounded
        std = torch.tensor(proc.image_processor.image_std).repeat_interleave(2 * 14 * 14)
        diff = (rows[k] - clean_rows[k]) * std
        assert abs(diff.std().item() - SIGMA) < 0.02
        assert ((x + d) > 1).any() and ((x + d) < 0).any()
        assert (diff * 255 - (diff * 255).round()).abs().max() > 0.1
    # the same tag gives the same noise in a numpy-returning call (TRL's chat-template path)
    again = ip([grpo_noise.tag(ims[1], 11)])
    torch.testing.assert_close(torch.as_tensor(again["pixel_values"]), rows[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        grpo_noise.NoiseImageProcessor(proc.image_processor, vlm, 0.0)


class _Spy(grpo_noise.NoisyGRPOTrainer):
    """Records the pixel values the generation and the policy-gradient loss see."""

    gen: list = []
    loss: list = []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kw):
        _Spy.gen.append((torch.as_tensor(multimodal_fields["pixel_values"]).clone(), images))
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, **kw)

    def _compute_loss(self, model, inputs):
        _Spy.loss.append((inputs["pixel_values"].detach().clone(), inputs["image_grid_thw"].clone()))
        return super()._compute_loss(model, inputs)


def _trainer(vlm, items, out_dir, cls=_Spy, sigma=SIGMA, draw="rollout"):
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0, max_completion_length=6)
    cfg = grpo.grpo_config(out_dir, recipe, seed=0, device="cpu", save_steps=10)
    return cls(model=vlm.model, reward_funcs=grpo.reward_funcs("nothink"), args=cfg,
               train_dataset=grpo.build_dataset(items, "nothink", SIZE), processing_class=vlm.processor,
               vlm=vlm, noise_sigma=sigma, noise_draw=draw, noise_seed=3)


@pytest.mark.parametrize("draw", ["rollout", "group"])
def test_generation_and_loss_see_the_same_draws(toy, tmp_path, draw):
    """Every rollout's generation and loss term see x + d with d from its tag; with draw="group" the
    G rollouts of a question share one d, with "rollout" each has its own."""
    items, vlm = toy[0], _fresh(toy)
    _Spy.gen, _Spy.loss = [], []
    trainer = _trainer(vlm, items, tmp_path, draw=draw)
    ip_before = vlm.processor.image_processor
    trainer.train()
    assert vlm.processor.image_processor is ip_before  # the wrapper is gone after the hook
    (gen_pv, gen_images), = _Spy.gen
    (loss_pv, grid), = _Spy.loss
    by_q = {it.question_id: it for it in items}
    n_rows = grid.prod(1).tolist()
    rows, gen_rows = loss_pv.split(n_rows), gen_pv.split(n_rows)
    # generation and loss: the same noisy pixels (TRL may reorder the batch between them)
    assert all(min((r - g).abs().max().item() for g in gen_rows) < 1e-6 for r in rows)
    expected = {(grpo_noise.seed_of(3, 0, q) if draw == "group" else grpo_noise.seed_of(3, 0, q, 0, k)): q
                for q in by_q for k in range(4)}
    seen = {}
    for r, (im,) in zip(gen_rows, gen_images):
        seed = im.info[grpo_noise.SEED_KEY]
        x = data.load_image(by_q[expected[seed]].image_path, SIZE)
        want = vlm.preprocess((x + grpo_noise.draw(x.shape, SIGMA, seed))[None])[0]
        torch.testing.assert_close(r, want, rtol=0, atol=1e-5)
        seen.setdefault(expected[seed], set()).add(seed)
    assert len(seen) == 2  # 2 questions x G = 4
    assert all(len(v) == (1 if draw == "group" else 4) for v in seen.values()), seen
    m = trainer.state.log_history[0]
    assert m["noise/sigma"] == SIGMA and m["noise/images"] == 8 and trainer.noisy_images == 8
    with pytest.raises(ValueError, match="noise_draw"):
        _trainer(vlm, items, tmp_path, draw="batch")


def test_zero_sigma_is_the_plain_trainer(toy, tmp_path):
    items, vlm = toy[0], _fresh(toy)
    _Spy.gen, _Spy.loss = [], []
    trainer = _trainer(vlm, items, tmp_path, sigma=0.0)
    trainer.train()
    (pv, grid), = _Spy.loss
    assert trainer.noisy_images == 0 and "noise/sigma" not in trainer.state.log_history[0]
    clean = {it.question_id: vlm.preprocess(data.load_image(it.image_path, SIZE)[None])[0] for it in items}
    for r in pv.split(grid.prod(1).tolist()):
        assert min((r - c).abs().max().item() for c in clean.values() if c.shape == r.shape) < 1e-5


def test_train_grpo_with_noise_and_with_attack_and_noise(toy, tmp_path):
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0, max_completion_length=6,
                        noise_sigma=SIGMA)
    start = {k: v.clone() for k, v in _fresh(toy).model.state_dict().items()}
    vlm = grpo.train_grpo(_fresh(toy), toy[0], recipe, mode="nothink", out_dir=tmp_path / "n")
    assert vlm.train_info["trainer"] == "NoisyGRPOTrainer" and vlm.train_info["noisy_images"] > 0
    assert any(not torch.equal(start[k], v) for k, v in vlm.model.state_dict().items())
    assert grpo.read_log(tmp_path / "n")["noise/sigma"].iloc[-1] == SIGMA
    vlm = grpo.train_grpo(_fresh(toy), toy[0], recipe, mode="nothink", out_dir=tmp_path / "an",
                          adversarial={"eps": 8 / 255, "alpha": 2 / 255, "steps": 1, "fraction": 1.0})
    info = vlm.train_info
    assert info["trainer"] == "ATGRPOTrainer" and info["attacked_images"] == 2 and info["noisy_images"] > 0
    assert issubclass(at_grpo.ATGRPOTrainer, grpo_noise.NoisyGRPOTrainer)
    assert issubclass(grpo_noise.NoisyGRPOTrainer, GRPOTrainer)


def test_recipe_key_keeps_older_runs():
    assert "noise_sigma" not in GRPORecipe().key() and "noise_draw" not in GRPORecipe().key()
    assert GRPORecipe(noise_sigma=0.25).key()["noise_sigma"] == 0.25
