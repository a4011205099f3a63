"""SFT: target format, loss goes down, resumable training, cached models."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from safemed_lib import data, models, prompts, sft, synth

SIZE = 56
TINY = dict(hidden_size=64, vocab_size=700)  # the conftest fixtures' base model


def _weights(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _log_steps(out_dir):
    return sft.read_log(out_dir)["step"].tolist()


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


def test_targets_pass_format_reward_and_parse(items):
    scenes = sft.scenes_for(items)
    assert {it.question_type for it in items} == set(data.QUESTION_TYPES)
    for it, scene in zip(items, scenes):
        think = sft.sft_targets(it, scene, "think")
        nothink = sft.sft_targets(it, None, "nothink")
        assert prompts.format_reward([think], mode="think") == [1.0]
        assert prompts.format_reward([nothink], mode="nothink") == [1.0]
        assert prompts.format_reward([nothink], mode="think") == [0.0]
        assert prompts.parse_answer(think, len(it.options)) == it.answer
        assert prompts.parse_answer(nothink, len(it.options)) == it.answer
        assert synth.rationale(it, scene) in think
        assert prompts.option_check(it.options, it.answer) + " </think>" in think  # judged in the prompt's order
    with pytest.raises(ValueError, match="scene"):
        sft.sft_targets(items[0], None, "think")
    with pytest.raises(ValueError, match="variant"):
        sft.sft_targets(items[0], None, "chat")


def test_shuffled_options_keep_the_answer_text_and_vary_with_the_seed(items):
    import random

    it = next(i for i in items if len(i.options) >= 4)
    orders = set()
    for k in range(20):
        s = sft.shuffle_options(it, random.Random(k))
        assert sorted(s.options) == sorted(it.options) and s.answer_text == it.answer_text
        assert s.question_id == it.question_id and it.options == list(it.options)  # the original is untouched
        orders.add(tuple(s.options))
    assert len(orders) > 5
    again = [sft.shuffle_options(it, random.Random(k)).options for k in range(3)]
    assert again == [sft.shuffle_options(it, random.Random(k)).options for k in range(3)]


def test_a_few_steps_reduce_the_loss(items, base_dir, tmp_path):
    vlm = models.load_vlm(base_dir)
    batch = items[:8]
    images = data.load_images(batch, size=SIZE)
    targets = sft.sft_target_list(batch, "think")
    with torch.no_grad():
        before = vlm.sequence_nll(images, batch, targets, prompt="think").mean().item()
    vlm = sft.train_sft(vlm, batch, variant="think", steps=12, lr=1e-2, batch_size=4, image_size=SIZE,
                        out_dir=tmp_path / "run", log_every=4, save_every=100)
    with torch.no_grad():
        after = vlm.sequence_nll(images, batch, targets, prompt="think").mean().item()
    assert after < 0.7 * before, (before, after)
    log = sft.read_log(tmp_path / "run")
    assert list(log["step"]) == [4, 8, 12] and list(log.columns) == list(sft.LOG_FIELDS)
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["steps"] == 12 and done["variant"] == "think"


def test_interrupted_run_resumes_exactly(items, base_dir, tmp_path, monkeypatch):
    kw = dict(variant="nothink", steps=6, lr=2e-3, batch_size=3, image_size=SIZE, log_every=1, save_every=2)
    reference = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "a", **kw)

    killed = CountingNLL(monkeypatch, fail_at=5)  # dies inside step 5; the last checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "b", **kw)
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-000004"
    assert not (tmp_path / "b" / "done.json").exists()

    resumed = CountingNLL(monkeypatch)
    vlm = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "b", **kw)
    assert resumed.calls == 2  # steps 5 and 6 only
    assert _log_steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]
    ref, got = _weights(reference), _weights(vlm)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    untrained = _weights(models.load_vlm(base_dir))
    assert any(not torch.equal(untrained[k], got[k]) for k in got)  # it did train


def test_fewer_then_more_steps_continues(items, base_dir, tmp_path, monkeypatch):
    kw = dict(variant="nothink", lr=2e-3, batch_size=3, image_size=SIZE, log_every=1, save_every=100,
              out_dir=tmp_path / "run")
    counter = CountingNLL(monkeypatch)
    sft.train_sft(models.load_vlm(base_dir), items, steps=3, **kw)
    assert counter.calls == 3
    vlm = sft.train_sft(models.load_vlm(base_dir), items, steps=3, **kw)  # finished: nothing to do
    assert counter.calls == 3
    sft.train_sft(vlm, items, steps=7, **kw)
    assert counter.calls == 7
    assert _log_steps(tmp_path / "run") == list(range(1, 8))
    assert json.loads((tmp_path / "run" / "done.json").read_text())["steps"] == 7
    with pytest.raises(ValueError, match="different run"):
        sft.train_sft(vlm, items, steps=8, **{**kw, "lr": 1e-3})
    with pytest.raises(ValueError, match="backwards"):
        sft.train_sft(vlm, items, steps=5, **kw)


def test_weight_decay_shrinks_the_weights_and_is_part_of_the_run(items, base_dir, tmp_path):
    kw = dict(variant="nothink", steps=3, lr=2e-3, batch_size=3, image_size=SIZE, log_every=1, save_every=100)
    plain = _weights(sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "plain", **kw))
    decayed = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "wd", weight_decay=0.5, **kw)
    assert json.loads((tmp_path / "wd" / "done.json").read_text())["weight_decay"] == 0.5
    assert "weight_decay" not in json.loads((tmp_path / "plain" / "done.json").read_text())
    norm = lambda w: sum(float(v.float().norm()) for k, v in w.items() if "embed_tokens" in k)  # noqa: E731
    assert norm(_weights(decayed)) < norm(plain)
    with pytest.raises(ValueError, match="different run.*weight_decay"):  # another decay is another run
        sft.train_sft(decayed, items, out_dir=tmp_path / "wd", **{**kw, "steps": 4})
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        sft.train_sft(decayed, items, out_dir=tmp_path / "neg", weight_decay=-0.1, **kw)


def test_batches_are_a_function_of_seed_and_step():
    n, bs = 10, 4
    order = [i for step in range(5) for i in sft.batch_indices(n, bs, step, seed=1)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))  # epochs
    assert sft.batch_indices(n, bs, 3, seed=1) == order[12:16]
    assert sft.batch_indices(n, bs, 0, seed=1) != sft.batch_indices(n, bs, 0, seed=2)


def test_a_fixed_vision_tower_stays_fixed_and_is_recorded(items, base_dir, tmp_path):
    vlm = models.load_vlm(base_dir)
    before = _weights(vlm)
    vlm = sft.train_sft(vlm, items[:8], variant="think", steps=3, lr=1e-2, batch_size=4, image_size=SIZE,
                        out_dir=tmp_path / "run", train_vision=False)
    changed = {k for k, v in _weights(vlm).items() if not torch.equal(v, before[k])}
    assert changed and not any(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in models.vision_tower(vlm).parameters())  # given back trainable
    assert json.loads((tmp_path / "run" / "done.json").read_text())["train_vision"] is False
    trained = sft.train_sft(models.load_vlm(base_dir), items[:8], variant="think", steps=3, lr=1e-2, batch_size=4,
                            image_size=SIZE, out_dir=tmp_path / "run2")
    assert any(".visual." in k and not torch.equal(v, before[k]) for k, v in _weights(trained).items())
    assert "train_vision" not in json.loads((tmp_path / "run2" / "done.json").read_text())


def test_a_fixed_vision_tower_embeds_each_image_once_with_the_same_result(items, base_dir, tmp_path, monkeypatch):
    """With the vision tower fixed, training reads each image's embeddings from a cache: every image is
    loaded and embedded once, and the weights are bit for bit those of embedding every batch anew."""
    kw = dict(variant="nothink", steps=6, lr=1e-2, batch_size=4, image_size=SIZE, train_vision=False)
    loads = []
    real_load = data.load_images
    monkeypatch.setattr(data, "load_images", lambda its, **k: loads.extend(it.image_path for it in its) or real_load(its, **k))
    cached = sft.train_sft(models.load_vlm(base_dir), items[:6], out_dir=tmp_path / "cached", **kw)
    assert len(loads) == len(set(loads)) == len({it.image_path for it in items[:6]})  # 24 draws, each image once
    monkeypatch.setattr(sft, "cached_image_embeds", lambda vlm, its, size, cache: data.load_images(its, size=size))
    before = len(loads)
    anew = sft.train_sft(models.load_vlm(base_dir), items[:6], out_dir=tmp_path / "anew", **kw)
    assert len(loads) - before == 6 * 4  # this run loaded every batch's images
    assert all(torch.equal(v, _weights(anew)[k]) for k, v in _weights(cached).items())


def test_ensure_sft_shares_one_base_and_caches(items, tmp_path, monkeypatch):
    builds = []
    orig = models.build_tiny_vlm
    monkeypatch.setattr(models, "build_tiny_vlm", lambda *a, **k: builds.append(1) or orig(*a, **k))
    kw = dict(image_size=SIZE, steps=2, lr=1e-3, batch_size=2, model_kwargs=TINY)
    think = sft.ensure_sft(tmp_path, "think", items, **kw)
    nothink = sft.ensure_sft(tmp_path, "nothink", items, **kw)
    assert len(builds) == 1  # one base, one tokenizer for both variants
    assert think.tokenizer.get_vocab() == nothink.tokenizer.get_vocab()
    for v in ("think", "nothink"):
        assert json.loads((tmp_path / f"sft-{v}" / "done.json").read_text())["variant"] == v

    def no_training(*a, **k):
        raise AssertionError("should load the cached model")

    monkeypatch.setattr(sft, "train_sft", no_training)
    again = sft.ensure_sft(tmp_path, "think", items, **kw)
    assert all(torch.equal(a, b) for a, b in zip(_weights(again).values(), _weights(think).values()))
    with pytest.raises(AssertionError, match="cached"):  # other settings: trained afresh
        sft.ensure_sft(tmp_path, "think", items, **{**kw, "steps": 3, "lr": 2e-3})
    with pytest.raises(AssertionError, match="cached"):  # a fixed tower is another run
        sft.ensure_sft(tmp_path, "think", items, **kw, train_vision=False)


def test_base_id_matches_the_recorded_tag(items, tmp_path):
    kw = dict(image_size=SIZE, steps=1, lr=1e-3, batch_size=2, model_kwargs=TINY)
    sft.ensure_sft(tmp_path, "nothink", items, **kw)
    done = json.loads((tmp_path / "sft-nothink" / "done.json").read_text())
    assert done["tag"] == {"base": sft.base_id(tmp_path)}


def test_base_pretrains_copying_and_the_vision_tower_on_scene_labels_only(items, base_dir, tmp_path):
    done = json.loads((base_dir.parent / "done.json").read_text())
    assert (done["copy_steps"], done["vision_steps"]) == (sft.BASE_COPY_STEPS, sft.BASE_VISION_STEPS)
    log = json.loads((base_dir.parent / "vision_log.json").read_text())
    assert log[-1]["step"] == sft.BASE_VISION_STEPS and log[-1]["loss"] < log[0]["loss"] / 2
    assert {"where_accuracy", "position_accuracy"} <= set(log[-1])  # lesion quadrants and token positions
    assert done["vision_recipe"]["position_weight"] == sft.BASE_POSITION_WEIGHT
    # a copy without the scene metadata (as a real OmniMedVQA root): no labels, no vision pretraining
    bare = tmp_path / "bare"
    shutil.copytree(sft.benchmark_root(items[0]), bare, ignore=shutil.ignore_patterns(synth.SCENES_FILE))
    assert sft._base_plan(data.load_omnimedvqa(bare), SIZE, 0, TINY)[2]["vision_steps"] == 0
    assert sft._base_plan(items, SIZE, 0, TINY, vision_steps=5)[2]["vision_steps"] == 5


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
    targets = sft.sft_target_list(batch, "think")
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
    kw = dict(variant="think", steps=4, lr=2e-3, batch_size=2, image_size=SIZE, log_every=1, save_every=2,
              adversarial={"eps": 4 / 255, "steps": 2, "fraction": 1.0})
    reference = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "a", **kw)
    done = json.loads((tmp_path / "a" / "done.json").read_text())
    assert done["adversarial"] == sft.adversarial_settings(kw["adversarial"])
    plain = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "plain",
                          **{**kw, "adversarial": None})
    assert "adversarial" not in json.loads((tmp_path / "plain" / "done.json").read_text())
    ref, other = _weights(reference), _weights(plain)
    assert any(not torch.equal(ref[k], other[k]) for k in ref)  # the attack changed what was learnt

    # 3 calls per attacked step (2 PGD steps + the SFT loss); die in step 3, resume from step 2
    CountingNLL(monkeypatch, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "b", **kw)
    resumed = CountingNLL(monkeypatch)
    vlm = sft.train_sft(models.load_vlm(base_dir), items, out_dir=tmp_path / "b", **kw)
    assert resumed.calls == 6  # steps 3 and 4 only
    got = _weights(vlm)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    with pytest.raises(ValueError, match="different run"):  # another attack is another run
        sft.train_sft(vlm, items, out_dir=tmp_path / "b", **{**kw, "adversarial": {"eps": 8 / 255}})


def test_ensure_adversarial_sft_starts_from_the_given_model_and_caches(items, base_dir, tmp_path, monkeypatch):
    starts = []

    def start():
        starts.append(1)
        return models.load_vlm(base_dir)

    kw = dict(image_size=SIZE, steps=2, lr=1e-3, batch_size=2, start=start, start_id="base-0",
              adversarial={"eps": 4 / 255, "steps": 1})
    first = sft.ensure_adversarial_sft(tmp_path, "nothink", items, **kw)
    done = json.loads((tmp_path / "sftat-nothink" / "done.json").read_text())
    assert starts == [1] and done["tag"] == {"start": "base-0"} and done["adversarial"]["eps"] == 4 / 255
    again = sft.ensure_adversarial_sft(tmp_path, "nothink", items, **kw)
    assert starts == [1]  # cached: the start model is not even loaded
    assert all(torch.equal(a, b) for a, b in zip(_weights(again).values(), _weights(first).values()))
    sft.ensure_adversarial_sft(tmp_path, "nothink", items, **{**kw, "start_id": "another"})
    assert starts == [1, 1]  # another starting point: trained afresh


def test_variants_trained_in_parallel_processes_equal_sequential_training(items, tmp_path):
    kw = dict(image_size=SIZE, steps=3, lr=1e-3, batch_size=2, model_kwargs=TINY, nothink_steps=4,
              nothink_binding_aux={"attention": 2})
    seq = sft.ensure_sft_variants(tmp_path / "seq", ["think", "nothink"], items, workers=1, **kw)
    par = sft.ensure_sft_variants(tmp_path / "par", ["think", "nothink"], items, workers=2, **kw)
    for v in ("think", "nothink"):
        a, b = _weights(seq[v]), _weights(par[v])
        assert all(torch.equal(a[k], b[k]) for k in a), v
    think, nothink = (json.loads((tmp_path / "par" / f"sft-{v}" / "done.json").read_text()) for v in ("think", "nothink"))
    assert think["steps"] == 3 and "binding_aux" not in think
    assert nothink["steps"] == 4 and nothink["binding_aux"]["attention"] == 2.0
    # a notebook that loads one variant through variant_kwargs gets the cached run, not a retrained one
    mtime = (tmp_path / "par" / "sft-nothink" / "done.json").stat().st_mtime_ns
    again = sft.ensure_sft(tmp_path / "par", "nothink", items, **sft.variant_kwargs("nothink", **kw))
    assert (tmp_path / "par" / "sft-nothink" / "done.json").stat().st_mtime_ns == mtime
    assert all(torch.equal(x, y) for x, y in zip(_weights(again).values(), _weights(par["nothink"]).values()))
    with pytest.raises(ValueError, match="workers"):
        sft.ensure_sft_variants(tmp_path / "x", ["think"], items, workers=0, **kw)


def test_variant_kwargs_gives_nothink_its_own_steps_and_binding():
    kw = dict(steps=10, lr=1e-3, nothink_steps=None, nothink_binding_aux=True)
    assert sft.variant_kwargs("think", **kw) == {"steps": 10, "lr": 1e-3}
    assert sft.variant_kwargs("nothink", **kw) == {"steps": 10, "lr": 1e-3, "binding_aux": True, "train_threads": None,
                                                   "weight_decay": 0.0}
    assert sft.variant_kwargs("nothink", **{**kw, "nothink_weight_decay": 0.1})["weight_decay"] == 0.1
    assert "weight_decay" not in sft.variant_kwargs("think", **{**kw, "nothink_weight_decay": 0.1})
    assert sft.variant_kwargs("nothink", **{**kw, "nothink_steps": 40})["steps"] == 40
    assert sft.variant_kwargs("nothink", **{**kw, "nothink_threads": 2})["train_threads"] == 2
    assert "train_threads" not in sft.variant_kwargs("think", **{**kw, "nothink_threads": 2})


def test_ensure_sft_trains_on_its_own_threads_and_restores_the_process_setting(items, tmp_path, monkeypatch):
    seen = []
    real = sft.train_sft

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)
    monkeypatch.setattr(sft, "train_sft", spy)
    kw = dict(image_size=SIZE, steps=2, lr=1e-3, batch_size=2, model_kwargs=TINY)
    before = torch.get_num_threads()
    sft.ensure_sft(tmp_path, "nothink", items, train_threads=before + 1, **kw)
    assert seen == [before + 1] and torch.get_num_threads() == before
    sft.ensure_sft(tmp_path, "nothink", items, train_threads=before + 2, **kw)
    assert seen == [before + 1]  # other threads, same recipe: the cached run is loaded
    with pytest.raises(ValueError, match="train_threads must be an integer >= 1"):
        sft.ensure_sft(tmp_path / "x", "nothink", items, train_threads=0, **kw)
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
    scenes = sft.scenes_for(items)
    multi = [(it, sc) for it, sc in zip(items, scenes) if " " in it.answer_text]
    assert multi, "the fixture needs multi-word answers"
    for it, scene in multi:
        ids = tok(sft.think_rationale(it, scene), add_special_tokens=False)["input_ids"]
        words = tok(" " + it.answer_text, add_special_tokens=False)["input_ids"]
        hits = [i for i in range(len(ids) - len(words) + 1) if ids[i:i + len(words)] == words]
        assert len(hits) >= 2, (it.question_id, tok.convert_ids_to_tokens(ids))
        glued = tok(")" + it.answer_text, add_special_tokens=False)["input_ids"]
        assert glued[:len(words)] != words


def test_vision_pretraining_gets_its_own_generated_images(items, tmp_path):
    """The base's vision pretraining sees a second generated set, BASE_PRETRAIN_IMAGES times the
    benchmark's size and from another seed: never one of the benchmark's images."""
    _, _, meta = sft._base_plan(items, SIZE, 0, None)
    bench = synth.read_stamp(sft.benchmark_root(items[0]))
    spec = meta["pretrain_images"]
    assert spec == {"n_images": sft.BASE_PRETRAIN_IMAGES * bench["n_images"],
                    "seed": bench["seed"] + sft.PRETRAIN_SEED_OFFSET, "size": SIZE}
    extra = sft.pretrain_images(tmp_path, spec)
    assert len({str(it.image_path) for it in extra}) == spec["n_images"]
    own = {p.read_bytes() for p in (sft.benchmark_root(items[0]) / "Images").rglob("*.png")}
    assert not own & {Path(it.image_path).read_bytes() for it in extra}
    # without vision steps (e.g. real OmniMedVQA) there is no such set
    assert "pretrain_images" not in sft._base_plan(items, SIZE, 0, None, vision_steps=0)[2]
