"""SFT: target format, loss goes down, resumable training, cached models (base, zoo)."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from safemed_lib import base, config, data, models, prompts, runs, sft, synth, zoo
from safemed_lib.config import SFTRecipe
from safemed_lib.targets import (benchmark_root, scenes_for, sft_target_list, sft_targets, shuffle_options,
                                 think_rationale)

SIZE = 56
TINY = dict(hidden_size=64, copy_steps=100, vision_steps=300, pretrain_images=1)  # the conftest base (config.TinyBase fields; short pretraining)


def _weights(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _log_steps(out_dir):
    return sft.read_log(out_dir)["step"].tolist()


def _cfg(tmp_path, items, **overrides):
    """The smoke profile on the 16-image benchmark of the ``items`` fixture, models under ``tmp_path``,
    a small base (``TINY``, a few pretraining steps) and 2-step SFT recipes; ``overrides`` by dotted key."""
    over = {"model.dir": str(tmp_path / "m"), "data.bench_dir": str(benchmark_root(items[0]).parent),
            "data.n_images": 16, "data.image_size": SIZE, "model.tiny.copy_steps": 5, "model.tiny.vision_steps": 5,
            "model.tiny.pretrain_images": 1, **{f"model.tiny.{k}": v for k, v in TINY.items()},
            "sft.think.steps": 2, "sft.think.lr": 1e-3, "sft.think.batch_size": 2,
            "sft.nothink.steps": 2, "sft.nothink.lr": 1e-3, "sft.nothink.batch_size": 2}
    return config.load("smoke", {**over, **{k.replace("__", "."): v for k, v in overrides.items()}})


class CountingNLL:
    """Counts VLM.sequence_nll calls (training steps); optionally fails on call ``fail_at``."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, orig = 0, fail_at, models.VLM.sequence_nll

        def wrapped(vlm, *a, **kw):
            self.calls += 1
            if self.calls == self.fail_at:
                raise KeyboardInterrupt("simulated kill")
            return orig(vlm, *a, **kw)

        monkeypatch.setattr(models.VLM, "sequence_nll", wrapped)


class CountingSFT:
    """Records every ``sft.train_sft`` call (variant, torch threads at the call, the starting weights);
    with ``fail``, raises instead of training."""

    def __init__(self, monkeypatch, fail=False):
        self.calls, real = [], sft.train_sft

        def spy(vlm, items, recipe, **kw):
            self.calls.append({"variant": kw["variant"], "threads": torch.get_num_threads(), "start": _weights(vlm)})
            if fail:
                raise AssertionError("should load the cached model")
            return real(vlm, items, recipe, **kw)

        monkeypatch.setattr(sft, "train_sft", spy)


def test_targets_pass_format_reward_and_parse(items):
    scenes = scenes_for(items)
    assert {it.question_type for it in items} == set(data.QUESTION_TYPES)
    for it, scene in zip(items, scenes):
        think = sft_targets(it, scene, "think")
        nothink = sft_targets(it, None, "nothink")
        assert prompts.format_reward([think], mode="think") == [1.0]
        assert prompts.format_reward([nothink], mode="nothink") == [1.0]
        assert prompts.format_reward([nothink], mode="think") == [0.0]
        assert prompts.parse_answer(think, len(it.options)) == it.answer
        assert prompts.parse_answer(nothink, len(it.options)) == it.answer
        assert synth.rationale(it, scene) in think
        assert prompts.option_check(it.options, it.answer) + " </think>" in think  # judged in the prompt's order
    with pytest.raises(ValueError, match="scene"):
        sft_targets(items[0], None, "think")
    with pytest.raises(ValueError, match="variant"):
        sft_targets(items[0], None, "chat")


def test_shuffled_options_keep_the_answer_text_and_vary_with_the_seed(items):
    import random

    it = next(i for i in items if len(i.options) >= 4)
    orders = set()
    for k in range(20):
        s = shuffle_options(it, random.Random(k))
        assert sorted(s.options) == sorted(it.options) and s.answer_text == it.answer_text
        assert s.question_id == it.question_id and it.options == list(it.options)  # the original is untouched
        orders.add(tuple(s.options))
    assert len(orders) > 5
    again = [shuffle_options(it, random.Random(k)).options for k in range(3)]
    assert again == [shuffle_options(it, random.Random(k)).options for k in range(3)]


def test_a_few_steps_reduce_the_loss(items, base_dir, tmp_path):
    vlm = models.load_vlm(base_dir)
    batch = items[:8]
    images = data.load_images(batch, size=SIZE)
    targets = sft_target_list(batch, "think")
    with torch.no_grad():
        before = vlm.sequence_nll(images, batch, targets, prompt="think").mean().item()
    vlm = sft.train_sft(vlm, batch, SFTRecipe(steps=12, lr=1e-2, batch_size=4), variant="think", image_size=SIZE,
                        out_dir=tmp_path / "run", log_every=4, save_every=100)
    with torch.no_grad():
        after = vlm.sequence_nll(images, batch, targets, prompt="think").mean().item()
    assert after < 0.7 * before, (before, after)
    log = sft.read_log(tmp_path / "run")
    assert list(log["step"]) == [4, 8, 12] and list(log.columns) == list(sft.LOG_FIELDS)
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    run = sft.read_run(tmp_path / "run")
    assert run["steps"] == 12 and run["variant"] == "think"
    assert run["model"] == "ckpt-000012/model" and (tmp_path / "run" / run["model"]).is_dir()


def test_interrupted_run_resumes_exactly(items, base_dir, tmp_path, monkeypatch):
    recipe = SFTRecipe(steps=6, lr=2e-3, batch_size=3)
    kw = dict(variant="nothink", image_size=SIZE, log_every=1, save_every=2)
    reference = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "a", **kw)

    killed = CountingNLL(monkeypatch, fail_at=5)  # dies inside step 5; the last checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "b", **kw)
    assert killed.calls == 5
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-000004"
    assert not (tmp_path / "b" / sft.RUN_FILE).exists() and sft.read_run(tmp_path / "b") is None

    resumed = CountingNLL(monkeypatch)
    vlm = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "b", **kw)
    assert resumed.calls == 2  # steps 5 and 6 only
    assert _log_steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]
    ref, got = _weights(reference), _weights(vlm)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    untrained = _weights(models.load_vlm(base_dir))
    assert any(not torch.equal(untrained[k], got[k]) for k in got)  # it did train


def test_keep_steps_leaves_snapshots_along_one_run(items, base_dir, tmp_path):
    recipe = SFTRecipe(steps=6, lr=2e-3, batch_size=3)
    vlm = sft.train_sft(models.load_vlm(base_dir), items, recipe, variant="nothink", image_size=SIZE,
                        out_dir=tmp_path, log_every=1, save_every=100, keep_steps=(2, 4))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000004", "ckpt-000006"]
    snap = {k: _weights(models.load_vlm(tmp_path / f"ckpt-00000{k}" / "model")) for k in (2, 4, 6)}
    final = _weights(vlm)
    assert all(torch.equal(snap[6][k], final[k]) for k in final)
    assert any(not torch.equal(snap[2][k], snap[4][k]) for k in final)


def test_fewer_then_more_steps_continues(items, base_dir, tmp_path, monkeypatch):
    kw = dict(variant="nothink", image_size=SIZE, log_every=1, save_every=100, out_dir=tmp_path / "run")
    recipe = lambda steps, lr=2e-3: SFTRecipe(steps=steps, lr=lr, batch_size=3)  # noqa: E731
    counter = CountingNLL(monkeypatch)
    sft.train_sft(models.load_vlm(base_dir), items, recipe(3), **kw)
    assert counter.calls == 3
    vlm = sft.train_sft(models.load_vlm(base_dir), items, recipe(3), **kw)  # finished: nothing to do
    assert counter.calls == 3
    sft.train_sft(vlm, items, recipe(7), **kw)
    assert counter.calls == 7
    assert _log_steps(tmp_path / "run") == list(range(1, 8))
    assert sft.read_run(tmp_path / "run")["steps"] == 7
    with pytest.raises(ValueError, match="different run"):
        sft.train_sft(vlm, items, recipe(8, lr=1e-3), **kw)
    with pytest.raises(ValueError, match="backwards"):
        sft.train_sft(vlm, items, recipe(5), **kw)


def test_weight_decay_shrinks_the_weights_and_is_part_of_the_run(items, base_dir, tmp_path):
    kw = dict(variant="nothink", image_size=SIZE, log_every=1, save_every=100)
    recipe = SFTRecipe(steps=3, lr=2e-3, batch_size=3)
    plain = _weights(sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "plain", **kw))
    decayed = sft.train_sft(models.load_vlm(base_dir), items, recipe.model_copy(update={"weight_decay": 0.5}),
                            out_dir=tmp_path / "wd", **kw)
    assert sft.read_run(tmp_path / "wd")["weight_decay"] == 0.5
    assert sft.read_run(tmp_path / "plain")["weight_decay"] == 0.0  # every setting is recorded, 0 too
    norm = lambda w: sum(float(v.float().norm()) for k, v in w.items() if "embed_tokens" in k)  # noqa: E731
    assert norm(_weights(decayed)) < norm(plain)
    with pytest.raises(ValueError, match="different run.*weight_decay"):  # another decay is another run
        sft.train_sft(decayed, items, recipe.model_copy(update={"steps": 4}), out_dir=tmp_path / "wd", **kw)
    with pytest.raises(ValidationError, match=r"weight_decay\s+Input should be greater than or equal to 0"):
        SFTRecipe(steps=3, lr=2e-3, batch_size=3, weight_decay=-0.1)


def test_batches_are_a_function_of_seed_and_step():
    n, bs = 10, 4
    order = [i for step in range(5) for i in sft.batch_indices(n, bs, step, seed=1)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))  # epochs
    assert sft.batch_indices(n, bs, 3, seed=1) == order[12:16]
    assert sft.batch_indices(n, bs, 0, seed=1) != sft.batch_indices(n, bs, 0, seed=2)


def test_a_fixed_vision_tower_stays_fixed_and_is_recorded(items, base_dir, tmp_path):
    vlm = models.load_vlm(base_dir)
    before = _weights(vlm)
    vlm = sft.train_sft(vlm, items[:8], SFTRecipe(steps=3, lr=1e-2, batch_size=4, train_vision=False),
                        variant="think", image_size=SIZE, out_dir=tmp_path / "run")
    changed = {k for k, v in _weights(vlm).items() if not torch.equal(v, before[k])}
    assert changed and not any(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in models.vision_tower(vlm).parameters())  # given back trainable
    assert sft.read_run(tmp_path / "run")["train_vision"] is False
    trained = sft.train_sft(models.load_vlm(base_dir), items[:8], SFTRecipe(steps=3, lr=1e-2, batch_size=4),
                            variant="think", image_size=SIZE, out_dir=tmp_path / "run2")
    assert any(".visual." in k and not torch.equal(v, before[k]) for k, v in _weights(trained).items())
    assert sft.read_run(tmp_path / "run2")["train_vision"] is True  # the recipe's default, recorded


def test_a_fixed_vision_tower_embeds_each_image_once_with_the_same_result(items, base_dir, tmp_path, monkeypatch):
    """With the vision tower fixed, training reads each image's embeddings from a cache: every image is
    loaded and embedded once, and the weights are bit for bit those of embedding every batch anew."""
    recipe = SFTRecipe(steps=6, lr=1e-2, batch_size=4, train_vision=False)
    kw = dict(variant="nothink", image_size=SIZE)
    loads = []
    real_load = data.load_images
    monkeypatch.setattr(data, "load_images", lambda its, **k: loads.extend(it.image_path for it in its) or real_load(its, **k))
    cached = sft.train_sft(models.load_vlm(base_dir), items[:6], recipe, out_dir=tmp_path / "cached", **kw)
    assert len(loads) == len(set(loads)) == len({it.image_path for it in items[:6]})  # 24 draws, each image once
    monkeypatch.setattr(sft, "cached_image_embeds", lambda vlm, its, size, cache: data.load_images(its, size=size))
    before = len(loads)
    anew = sft.train_sft(models.load_vlm(base_dir), items[:6], recipe, out_dir=tmp_path / "anew", **kw)
    assert len(loads) - before == 6 * 4  # this run loaded every batch's images
    assert all(torch.equal(v, _weights(anew)[k]) for k, v in _weights(cached).items())


def test_zoo_sft_shares_one_base_and_caches(items, tmp_path, monkeypatch):
    builds = []
    orig = models.build_tiny_vlm
    monkeypatch.setattr(models, "build_tiny_vlm", lambda *a, **k: builds.append(1) or orig(*a, **k))
    cfg = _cfg(tmp_path, items)
    think = zoo.load("sft-think", cfg)
    nothink = zoo.load("sft-nothink", cfg)
    assert len(builds) == 1  # one base, one tokenizer for both variants
    assert think.tokenizer.get_vocab() == nothink.tokenizer.get_vocab()
    for v in ("think", "nothink"):
        assert sft.read_run(zoo.run_dir(f"sft-{v}", cfg) / "train")["variant"] == v
        assert zoo.is_trained(f"sft-{v}", cfg)

    CountingSFT(monkeypatch, fail=True)
    again = zoo.load("sft-think", cfg)
    assert all(torch.equal(a, b) for a, b in zip(_weights(again).values(), _weights(think).values()))
    with pytest.raises(AssertionError, match="cached"):  # other settings: trained afresh
        zoo.ensure("sft-think", _cfg(tmp_path, items, sft__think__steps=3, sft__think__lr=2e-3))
    with pytest.raises(AssertionError, match="cached"):  # a fixed (or trained) tower is another run
        zoo.ensure("sft-think", _cfg(tmp_path, items, sft__think__train_vision=not cfg.sft.think.train_vision))
    assert len(builds) == 1  # the base itself was not rebuilt for either


def test_sft_key_records_the_base_it_starts_from(items, tmp_path):
    """An SFT model's cache key holds its base's key: the run records which base it was trained from,
    and another base (here: more copy steps) is another SFT model."""
    cfg = _cfg(tmp_path, items, sft__nothink__steps=1)
    zoo.ensure("sft-nothink", cfg)
    done, base_done = runs.read_done(zoo.run_dir("sft-nothink", cfg)), runs.read_done(zoo.run_dir("base", cfg))
    assert done["fingerprint"] == zoo.fingerprint("sft-nothink", cfg)
    assert done["key"]["parent"] == base_done["key"] and base_done["fingerprint"] == zoo.fingerprint("base", cfg)
    other = _cfg(tmp_path, items, sft__nothink__steps=1, model__tiny__copy_steps=6)
    assert zoo.key("sft-nothink", other)["parent"] != zoo.key("sft-nothink", cfg)["parent"]
    assert not zoo.is_trained("sft-nothink", other) and not zoo.is_trained("base", other)


def test_base_pretrains_copying_and_the_vision_tower_on_scene_labels_only(items, base_dir, tmp_path):
    tiny = config.TinyBase(**TINY)
    plan = base.plan(items, config.TinyBase(), image_size=SIZE, seed=0)
    assert (plan["recipe"]["copy_steps"], plan["recipe"]["vision_steps"]) == (400, 2000)  # the defaults
    assert plan["recipe"]["position_weight"] == config.TinyBase().position_weight == 1.0
    assert json.loads((base_dir.parent / "copy_log.json").read_text())[-1]["step"] == tiny.copy_steps
    log = json.loads((base_dir.parent / "vision_log.json").read_text())
    assert log[-1]["step"] == tiny.vision_steps and log[-1]["loss"] < log[0]["loss"] / 2
    assert {"where_accuracy", "position_accuracy"} <= set(log[-1])  # lesion quadrants and token positions
    # a copy without the scene metadata (as a real OmniMedVQA root): no labels, no vision pretraining
    bare = tmp_path / "bare"
    shutil.copytree(benchmark_root(items[0]), bare, ignore=shutil.ignore_patterns(synth.SCENES_FILE))
    assert base.plan(data.load_omnimedvqa(bare), tiny, image_size=SIZE, seed=0)["recipe"]["vision_steps"] == 0
    five = config.TinyBase(**{**TINY, "vision_steps": 5})
    assert base.plan(items, five, image_size=SIZE, seed=0)["recipe"]["vision_steps"] == 5


# --------------------------------------------------------------------------- adversarial SFT
def test_adversarial_settings_complete_and_reject_bad_values():
    adv = sft.adversarial_settings({"eps": 8 / 255, "steps": 4})
    assert adv == {"eps": 8 / 255, "alpha": 2.5 * (8 / 255) / 4, "steps": 4, "fraction": 0.5, "norm": "linf"}
    assert sft.adversarial_settings(None) is None
    for bad, match in (({"epsilon": 0.1}, "unknown keys.*epsilon"), ({"fraction": 0.0}, "fraction"),
                       ({"fraction": 1.5}, "fraction"), ({"eps": 0}, "eps"), ({"steps": 2.5}, "steps"),
                       ({"norm": "l1"}, "norm"), ({"alpha": -1.0}, "alpha")):
        with pytest.raises(ValueError, match=match):
            sft.adversarial_settings(bad)
    with pytest.raises(TypeError, match="dict"):
        sft.adversarial_settings(0.03)


def test_adversarial_images_attack_the_first_fraction_within_the_ball(items, base_dir):
    vlm = models.load_vlm(base_dir)
    batch = items[:4]
    images = data.load_images(batch, size=SIZE)
    targets = sft_target_list(batch, "think")
    eps = 8 / 255
    vlm.model.train()
    x = sft.adversarial_images(vlm, images, batch, targets, prompt="think",
                               adversarial={"eps": eps, "steps": 3, "fraction": 0.5},
                               generator=torch.Generator().manual_seed(0))
    assert vlm.model.training  # the train mode is restored after the attack
    assert torch.equal(x[2:], images[2:])  # only round(0.5 * 4) = 2 images are attacked
    delta = x[:2] - images[:2]
    assert delta.abs().max() <= eps + 1e-6 and delta.abs().max() > 0
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-3)  # on the 8-bit grid, like a saved PNG
    with torch.no_grad():  # the attack ascends the very loss the SFT step descends
        clean = vlm.sequence_nll(images[:2], batch[:2], targets[:2], prompt="think")
        adv = vlm.sequence_nll(x[:2], batch[:2], targets[:2], prompt="think")
    assert (adv > clean).all(), (clean, adv)


def test_adversarial_sft_records_its_attack_and_resumes_exactly(items, base_dir, tmp_path, monkeypatch):
    recipe = SFTRecipe(steps=4, lr=2e-3, batch_size=2)
    kw = dict(variant="think", image_size=SIZE, log_every=1, save_every=2,
              adversarial={"eps": 4 / 255, "steps": 2, "fraction": 1.0})
    reference = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "a", **kw)
    assert sft.read_run(tmp_path / "a")["adversarial"] == sft.adversarial_settings(kw["adversarial"])
    plain = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "plain",
                          **{**kw, "adversarial": None})
    assert sft.read_run(tmp_path / "plain")["adversarial"] is None
    ref, other = _weights(reference), _weights(plain)
    assert any(not torch.equal(ref[k], other[k]) for k in ref)  # the attack changed what was learnt

    # 3 calls per attacked step (2 PGD steps + the SFT loss); die in step 3, resume from step 2
    CountingNLL(monkeypatch, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "b", **kw)
    resumed = CountingNLL(monkeypatch)
    vlm = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "b", **kw)
    assert resumed.calls == 6  # steps 3 and 4 only
    got = _weights(vlm)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    with pytest.raises(ValueError, match="different run"):  # another attack is another run
        sft.train_sft(vlm, items, recipe, out_dir=tmp_path / "b", **{**kw, "adversarial": {"eps": 8 / 255}})


def test_zoo_adversarial_sft_starts_from_its_sft_model_and_caches(items, tmp_path, monkeypatch):
    """``sftat-<m>`` trains from ``sft-<m>`` (the start is loaded only to train) with the profile's
    training attack; cached afterwards; another start (another SFT recipe) trains it afresh."""
    loads, real_load = [], zoo.load

    def counting_load(name, cfg, **kw):
        loads.append(str(name))
        return real_load(name, cfg, **kw)

    monkeypatch.setattr(zoo, "load", counting_load)  # what zoo.ensure loads to start training from
    cfg = _cfg(tmp_path, items, safemed__at_sft__steps=2, safemed__at_sft__batch_size=2,
               safemed__train_attack__eps=4)
    trained = CountingSFT(monkeypatch)
    zoo.ensure("sftat-nothink", cfg)
    assert loads == ["sft-nothink", "base"] and [c["variant"] for c in trained.calls] == ["nothink", "nothink"]
    start = _weights(models.load_vlm(zoo.ensure("sft-nothink", cfg)))
    assert all(torch.equal(start[k], v) for k, v in trained.calls[1]["start"].items())  # trained from sft-nothink
    run = sft.read_run(zoo.run_dir("sftat-nothink", cfg) / "train")
    assert run["adversarial"]["eps"] == 4 / 255 and run["adversarial"]["steps"] == cfg.safemed.train_attack.steps
    assert run["steps"] == 2 and zoo.key("sftat-nothink", cfg)["parent"] == zoo.key("sft-nothink", cfg)
    first = _weights(real_load("sftat-nothink", cfg))
    n_loads = len(loads)
    again = zoo.load("sftat-nothink", cfg)
    assert loads[n_loads:] == ["sftat-nothink"] and len(trained.calls) == 2  # cached: the start is not loaded
    assert all(torch.equal(first[k], v) for k, v in _weights(again).items())
    other = _cfg(tmp_path, items, safemed__at_sft__steps=2, safemed__at_sft__batch_size=2,
                 safemed__train_attack__eps=4, sft__nothink__steps=3)
    zoo.ensure("sftat-nothink", other)
    assert len(trained.calls) == 4 and "sft-nothink" in loads[n_loads + 1:]  # another start: trained afresh


@pytest.mark.slow  # make test runs it; the fast tier (make unit) does not
def test_variants_trained_in_parallel_processes_equal_sequential_training(items, tmp_path):
    """``baseline.train`` with ``sft.workers`` 2 (one process per variant) gives the very weights of
    training one after the other; the runs are then the zoo's cached models."""
    from safemed_lib.experiments import baseline

    over = dict(sft__think__steps=3, sft__nothink__steps=4, sft__nothink__binding={"attention": 2})
    seq = baseline.train(_cfg(tmp_path / "seq", items, sft__workers=1, **over))
    par_cfg = _cfg(tmp_path / "par", items, sft__workers=2, **over)
    par = baseline.train(par_cfg)
    assert set(seq) == set(par) == {"think", "nothink"}
    for v in ("think", "nothink"):
        a, b = _weights(seq[v]), _weights(par[v])
        assert all(torch.equal(a[k], b[k]) for k in a), v
    think, nothink = (sft.read_run(zoo.run_dir(f"sft-{v}", par_cfg) / "train") for v in ("think", "nothink"))
    assert think["steps"] == 3 and think["binding_aux"] is None
    assert nothink["steps"] == 4 and nothink["binding_aux"]["attention"] == 2.0
    # a notebook that loads one variant through the zoo gets the cached run, not a retrained one
    done = zoo.run_dir("sft-nothink", par_cfg) / runs.DONE
    mtime = done.stat().st_mtime_ns
    again = zoo.load("sft-nothink", par_cfg)
    assert done.stat().st_mtime_ns == mtime
    assert all(torch.equal(x, y) for x, y in zip(_weights(again).values(), _weights(par["nothink"]).values()))
    with pytest.raises(config.ConfigError, match="workers"):
        _cfg(tmp_path / "x", items, sft__workers=0)


def test_each_variant_has_its_own_recipe():
    """The nothink recipe (its own steps, binding terms, weight decay and threads) is nothink's alone:
    the think recipe has none of them."""
    think, nothink = config.Config().sft.think, config.Config().sft.nothink
    assert (think.binding, think.weight_decay, think.threads) == (None, 0.0, None)
    assert nothink.binding == config.Binding(content=1.0, scene=1.0) and nothink.binding.attention == 1.0
    assert (nothink.steps, nothink.weight_decay, nothink.threads) == (10000, 0.3, 2)
    assert think.steps == 2500 and think.train_vision is nothink.train_vision is False
    assert SFTRecipe(binding=True).binding == config.Binding() and SFTRecipe(binding=False).binding is None


def test_nothink_recipe_changes_only_the_nothink_model(items, tmp_path):
    cfg = _cfg(tmp_path, items)
    other = _cfg(tmp_path, items, sft__nothink__weight_decay=0.1, sft__nothink__steps=40)
    assert zoo.key("sft-think", other) == zoo.key("sft-think", cfg)
    assert zoo.key("sft-nothink", other) != zoo.key("sft-nothink", cfg)
    assert zoo.key("sft-nothink", other)["recipe"]["weight_decay"] == 0.1
    assert zoo.key("sft-nothink", other)["recipe"]["steps"] == 40


def test_zoo_trains_on_the_recipes_threads_and_restores_the_process_setting(items, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    cfg = _cfg(tmp_path, items, sft__nothink__threads=before + 1)
    more = _cfg(tmp_path, items, sft__nothink__threads=before + 2)
    assert zoo.key("sft-nothink", cfg) == zoo.key("sft-nothink", more)  # threads are not part of the key
    assert zoo.key("sft-nothink", _cfg(tmp_path, items, sft__nothink__threads=1)) == \
        zoo.key("sft-nothink", _cfg(tmp_path, items, sft__nothink__threads=2))
    spy = CountingSFT(monkeypatch)
    zoo.ensure("sft-nothink", cfg)
    assert [c["threads"] for c in spy.calls] == [before + 1] and torch.get_num_threads() == before
    zoo.ensure("sft-nothink", more)
    assert len(spy.calls) == 1  # other threads, same recipe: the cached run is found
    assert torch.get_num_threads() == before
    failing = CountingSFT(monkeypatch, fail=True)  # a run that fails gives the threads back too
    with pytest.raises(AssertionError):
        zoo.ensure("sft-nothink", _cfg(tmp_path, items, sft__nothink__threads=before + 1, sft__nothink__steps=3))
    assert [c["threads"] for c in failing.calls] == [before + 1] and torch.get_num_threads() == before
    with pytest.raises(config.ConfigError, match="threads"):
        _cfg(tmp_path, items, sft__nothink__threads=0)
    assert torch.get_num_threads() == before


def test_background_reraises_the_workers_error():
    from safemed_lib import workbook

    job = workbook.background(sft.adversarial_settings, {"fraction": 2.0})
    with pytest.raises(ValueError, match="fraction"):
        job.result(timeout=300)


def _tqdm_disabled_here(path):
    from tqdm.auto import tqdm

    Path(path).write_text(str(tqdm(range(1)).disable))


def test_background_worker_shows_no_progress_bars_and_the_caller_keeps_its_own(tmp_path):
    """A worker's bars would interleave with the notebook's; the caller's environment is restored."""
    import os

    from safemed_lib import workbook
    from tqdm.auto import tqdm

    before = os.environ.get("TQDM_DISABLE")
    workbook.background(_tqdm_disabled_here, tmp_path / "state").result(timeout=300)
    assert (tmp_path / "state").read_text() == "True"
    assert os.environ.get("TQDM_DISABLE") == before and tqdm(range(1), file=open(os.devnull, "w")).disable is False


def test_option_check_repeats_the_conclusions_tokens(items, base_dir):
    """With the tiny tokenizer, the right option's words in the option check are the very tokens the
    rationale's conclusion ends with (``... So it is in the left upper zone. Options: A) left upper zone yes``);
    in the prompt's glued form ``A)left`` the first word would be another token."""
    tok = models.load_vlm(base_dir).tokenizer
    scenes = scenes_for(items)
    multi = [(it, sc) for it, sc in zip(items, scenes) if " " in it.answer_text]
    assert multi, "the fixture needs multi-word answers"
    for it, scene in multi:
        ids = tok(think_rationale(it, scene), add_special_tokens=False)["input_ids"]
        words = tok(" " + it.answer_text, add_special_tokens=False)["input_ids"]
        hits = [i for i in range(len(ids) - len(words) + 1) if ids[i:i + len(words)] == words]
        assert len(hits) >= 2, (it.question_id, tok.convert_ids_to_tokens(ids))
        glued = tok(")" + it.answer_text, add_special_tokens=False)["input_ids"]
        assert glued[:len(words)] != words


def test_vision_pretraining_gets_its_own_generated_images(items, tmp_path):
    """The base's vision pretraining sees a second generated set, ``TinyBase.pretrain_images`` times the
    benchmark's size and from another seed: never one of the benchmark's images."""
    tiny = config.TinyBase()
    bench = synth.read_stamp(benchmark_root(items[0]))
    spec = base.plan(items, tiny, image_size=SIZE, seed=0)["pretrain_images"]
    assert spec == {"n_images": tiny.pretrain_images * bench["n_images"],
                    "seed": bench["seed"] + tiny.pretrain_seed_offset, "size": SIZE}
    assert (tiny.pretrain_images, tiny.pretrain_seed_offset) == (3, 7)  # the measured setting
    extra = base.pretrain_items(tmp_path, spec)
    assert len({str(it.image_path) for it in extra}) == spec["n_images"]
    own = {p.read_bytes() for p in (benchmark_root(items[0]) / "Images").rglob("*.png")}
    assert not own & {Path(it.image_path).read_bytes() for it in extra}
    # without vision steps (e.g. real OmniMedVQA) there is no such set
    assert "pretrain_images" not in base.plan(items, config.TinyBase(vision_steps=0), image_size=SIZE, seed=0)


def test_noise_training_adds_the_recipes_gaussian_noise_to_every_image_and_is_part_of_the_run(items, base_dir,
                                                                                             tmp_path, monkeypatch):
    seen, real = [], models.VLM.sequence_nll
    monkeypatch.setattr(models.VLM, "sequence_nll", lambda self, images, *a, **kw: (
        seen.append(images.detach().clone() if isinstance(images, torch.Tensor) else None) or real(self, images, *a, **kw)))
    recipe = SFTRecipe(steps=2, lr=2e-3, batch_size=4, train_vision=False, noise_sigma=0.5)
    kw = dict(variant="think", image_size=SIZE, log_every=1, save_every=2)
    noisy = sft.train_sft(models.load_vlm(base_dir), items, recipe, out_dir=tmp_path / "n", **kw)
    batch, _, _ = sft._batch(items, sft._scenes(items, "think", None), "think", 4, 0, 0)
    delta = seen[0] - data.load_images(batch, size=SIZE)   # every image of the first step, not clamped
    assert delta.std().item() == pytest.approx(0.5, rel=0.05) and (seen[0] < 0).any() and (seen[0] > 1).any()
    assert sft.read_run(tmp_path / "n")["noise_sigma"] == 0.5
    plain_recipe = recipe.model_copy(update={"noise_sigma": 0.0})
    plain = sft.train_sft(models.load_vlm(base_dir), items, plain_recipe, out_dir=tmp_path / "p", **kw)
    assert "noise_sigma" not in sft.read_run(tmp_path / "p")           # runs without noise keep their settings
    assert "noise_sigma" not in plain_recipe.key() and recipe.key()["noise_sigma"] == 0.5
    a, b = _weights(noisy), _weights(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_format_only_warmup_teaches_the_form_and_never_scores_the_answer(items, base_dir, tmp_path, monkeypatch):
    from safemed_lib.targets import FORMAT_RATIONALE

    seen, real = [], models.VLM.sequence_nll
    monkeypatch.setattr(models.VLM, "sequence_nll", lambda self, *a, **kw: (
        seen.append((a[2], kw.get("uniform_over"))) or real(self, *a, **kw)))
    recipe = SFTRecipe(steps=2, lr=2e-3, batch_size=4, train_vision=False, format_only=True)
    kw = dict(image_size=SIZE, log_every=1, save_every=2)
    vlm = models.load_vlm(base_dir)
    sft.train_sft(vlm, items, recipe, variant="think", out_dir=tmp_path / "t", **kw)
    targets, uniform = seen[0]
    batch, again, _ = sft._batch(items, [None] * len(items), "think", 4, 0, 0, True)
    assert [list(u) for u in uniform] == [vlm.letter_token_ids(len(it.options)) for it in batch]
    assert targets == again and all(FORMAT_RATIONALE in t and prompts.format_reward([t], "think") == [1.0]
                                    and prompts.parse_answer(t, len(it.options)) for t, it in zip(targets, batch))
    assert sft.read_run(tmp_path / "t")["format_only"] is True and recipe.key()["format_only"] is True
    assert "format_only" not in recipe.model_copy(update={"format_only": False}).key()  # older runs keep their keys
    # the answer is never taught: the same questions with every answer changed give the same weights
    wrong = [dataclasses.replace(it, answer=prompts.LETTERS[(prompts.LETTERS.index(it.answer) + 1) % len(it.options)])
             for it in items]
    a = sft.train_sft(models.load_vlm(base_dir), items, recipe, variant="nothink", out_dir=tmp_path / "a", **kw)
    b = sft.train_sft(models.load_vlm(base_dir), wrong, recipe, variant="nothink", out_dir=tmp_path / "b", **kw)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="format_only"):
        sft.train_sft(models.load_vlm(base_dir), items, SFTRecipe(**{**recipe.model_dump(), "binding": True}), variant="nothink",
                      out_dir=tmp_path / "c", **kw)
