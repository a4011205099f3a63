"""Auxiliary option-binding losses for answer-only SFT (safemed_lib.binding, a recipe's ``binding``)."""
import dataclasses
import re
import shutil

import pytest
import torch

from safemed_lib import binding, config, data, models, prompts, sft, synth
from safemed_lib.config import SFTRecipe
from safemed_lib.targets import benchmark_root, scenes_for, sft_targets

SIZE = 56
TINY = dict(hidden_size=64, copy_steps=100, vision_steps=300, pretrain_images=1)  # the conftest base (config.TinyBase fields; short pretraining)


def _weights(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _one_step(**recipe):
    return SFTRecipe(steps=1, lr=1e-3, batch_size=2, **recipe)


def _vocab_size(vlm):
    return vlm.model.config.text_config.vocab_size


def _forward(base_dir, batch):
    """The base model (eager attention) and the ``extras`` of one answer-only forward pass on ``batch``."""
    vlm = models.load_vlm(base_dir)
    vlm.model.set_attn_implementation("eager")
    extras = {}
    with torch.no_grad():
        vlm.sequence_nll(data.load_images(batch, size=SIZE), batch,
                         [sft_targets(it, None, "nothink") for it in batch], prompt="nothink", extras=extras)
    return vlm, extras


def test_settings_fill_defaults_and_reject_bad_values():
    assert binding.settings(None) is None and binding.settings(False) is None
    assert binding.settings(True) == binding.DEFAULTS
    assert binding.settings({"attention": 2})["attention"] == 2.0
    with pytest.raises(ValueError, match="unknown keys \\['atention'\\]"):
        binding.settings({"atention": 1.0})
    with pytest.raises(ValueError, match="'match'.*>= 0"):
        binding.settings({"match": -1})
    with pytest.raises(ValueError, match="'layer'.*>= 1"):
        binding.settings({"layer": 0})
    assert binding.settings({"head": (0, 2)})["head"] == [0, 2]
    for bad in ([], [0, 0], [0, -1], True, 1.0):
        with pytest.raises(ValueError, match=re.escape("binding_aux['head'] must be an integer >= 0")):
            binding.settings({"head": bad})


def test_option_token_labels_mark_every_options_tokens(items, base_dir):
    vlm = models.load_vlm(base_dir)
    multi = [it for it in items if any(" " in o for o in it.options)]
    assert multi  # options of several words are covered
    for it in items[:6] + multi[:3]:
        ids = vlm.prompt_ids(it, "nothink", 4)
        right, which = binding.option_token_labels(vlm, it, "nothink", 4)
        assert len(right) == len(which) == len(ids)
        for i, option in enumerate(it.options):
            text = vlm.tokenizer.decode([t for t, w in zip(ids, which) if w == i])
            assert text.lstrip(")").strip() == option  # the glued ")" of "A)text" comes along
            assert {r for r, w in zip(right, which) if w == i} == {int(prompts.LETTERS[i] == it.answer)}
        assert {r for r, w in zip(right, which) if w < 0} == {-1}


def test_binding_sft_learns_its_terms_resumes_exactly_and_saves_the_plain_model(items, base_dir, tmp_path,
                                                                                monkeypatch):
    recipe = SFTRecipe(steps=12, lr=1e-2, batch_size=4, binding={"content": 1.0, "scene": 1.0})  # every term and head
    kw = dict(variant="nothink", image_size=SIZE, log_every=1, save_every=6)
    reference = sft.train_sft(models.load_vlm(base_dir), items[:8], recipe, out_dir=tmp_path / "a", **kw)
    log = sft.read_log(tmp_path / "a")
    import pandas as pd
    aux = pd.read_csv(tmp_path / "a" / "binding_log.csv")
    assert list(aux.columns) == list(sft.BINDING_LOG_FIELDS) and list(aux["step"]) == list(range(1, 13))
    assert aux[["match", "letter", "attention", "content", "scene"]].notna().all().all()
    for term in ("attention", "letter", "content"):  # learnt within 12 steps (the scene term is tested below)
        assert aux[term].iloc[-3:].mean() < aux[term].iloc[:3].mean(), term
    assert list(log["step"]) == list(range(1, 13))
    done = sft.read_run(tmp_path / "a")
    assert done["binding_aux"] == {**binding.DEFAULTS, "content": 1.0, "scene": 1.0}
    assert config.Binding().model_dump() == binding.DEFAULTS  # the recipe's defaults are the loss's
    saved = models.load_vlm(tmp_path / "a" / done["model"])
    assert set(_weights(saved)) == set(_weights(models.load_vlm(base_dir)))  # no auxiliary heads
    assert reference.model.config._attn_implementation != "eager"  # restored after training

    orig, calls = models.VLM.sequence_nll, {"n": 0}

    def dies_in_step_8(vlm, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated kill")
        return orig(vlm, *a, **k)

    monkeypatch.setattr(models.VLM, "sequence_nll", dies_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(models.load_vlm(base_dir), items[:8], recipe, out_dir=tmp_path / "b", **kw)
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-000006"
    monkeypatch.setattr(models.VLM, "sequence_nll", orig)
    resumed = sft.train_sft(models.load_vlm(base_dir), items[:8], recipe, out_dir=tmp_path / "b", **kw)
    ref, got = _weights(reference), _weights(resumed)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)  # heads restored from state.pt too
    assert pd.read_csv(tmp_path / "b" / "binding_log.csv")["step"].tolist() == list(range(1, 13))
    plain = sft.train_sft(models.load_vlm(base_dir), items[:8], recipe.model_copy(update={"binding": None}),
                          out_dir=tmp_path / "plain", **kw)
    assert sft.read_run(tmp_path / "plain")["binding_aux"] is None
    assert any(not torch.equal(ref[k], v) for k, v in _weights(plain).items())
    with pytest.raises(ValueError, match="different run"):
        sft.train_sft(resumed, items[:8], SFTRecipe(steps=12, lr=1e-2, batch_size=4, binding={"attention": 2.0}),
                      out_dir=tmp_path / "b", **kw)


def test_binding_aux_is_for_answer_first_targets_and_existing_layers(items, base_dir, tmp_path):
    with pytest.raises(ValueError, match="variant 'think'"):
        sft.train_sft(models.load_vlm(base_dir), items[:4], _one_step(binding=True), variant="think",
                      image_size=SIZE, out_dir=tmp_path / "t")
    bare = tmp_path / "bare"  # a copy without the scene metadata, as a real OmniMedVQA root
    shutil.copytree(benchmark_root(items[0]), bare, ignore=shutil.ignore_patterns(synth.SCENES_FILE))
    with pytest.raises(ValueError, match=re.escape("binding's scene term needs the embedded benchmark's scene")):
        sft.train_sft(models.load_vlm(base_dir), data.load_omnimedvqa(bare)[:4], _one_step(binding={"scene": 1.0}),
                      variant="nothink", image_size=SIZE, out_dir=tmp_path / "s")
    with pytest.raises(ValueError, match=re.escape("binding_aux['layer']=2 must be below the language model's 2 layers")):
        sft.train_sft(models.load_vlm(base_dir), items[:4], _one_step(binding={"layer": 2}), variant="nothink",
                      image_size=SIZE, out_dir=tmp_path / "n")
    assert not any((tmp_path / d / sft.RUN_FILE).exists() for d in "tsn")  # none of them trained


def test_attention_term_over_several_heads_is_the_mean_of_theirs(items, base_dir, tmp_path):
    batch = items[:4]
    vlm, extras = _forward(base_dir, batch)
    heads = binding.BindingHeads(TINY["hidden_size"])

    def term(head):
        return binding.binding_loss(vlm, heads, binding.settings({"head": head}), extras, batch, "nothink")[1]["attention"]
    one = [term(h) for h in range(4)]
    assert len(set(one)) == 4  # the heads attend differently, so the mean below is not a coincidence
    assert term([0, 2]) == pytest.approx((one[0] + one[2]) / 2, rel=1e-5)
    assert term([0, 1, 2, 3]) == pytest.approx(sum(one) / 4, rel=1e-5)
    n_heads = vlm.model.config.text_config.num_attention_heads
    with pytest.raises(ValueError, match=re.escape(f"binding_aux['head']=[0, {n_heads}]: the model has {n_heads}")):
        sft.train_sft(vlm, items[:4], _one_step(binding={"head": [0, n_heads]}), variant="nothink", image_size=SIZE,
                      out_dir=tmp_path / "h")


def test_content_term_scores_the_options_at_the_letter_position(items, base_dir):
    """The content term is a cross-entropy over the options, each scored by the mean of its tokens'
    logits from the letter position's state: a head that favours the right option's tokens drives it
    near 0, one that favours a wrong option's drives it up; without the weight there is no head."""
    batch = [it for it in items if len(set(it.options)) == len(it.options)][:4]
    vlm, extras = _forward(base_dir, batch)
    cfg = binding.settings({"content": 1.0})
    assert binding.BindingHeads(TINY["hidden_size"]).content is None
    heads = binding.BindingHeads(TINY["hidden_size"], vocab_size=_vocab_size(vlm))
    ids = extras["inputs"]["input_ids"]
    n_image = [int((row == vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) for row in ids]

    def favour(pick):  # a content head whose logits are +10 on the tokens only option pick(item) has
        with torch.no_grad():
            heads.content.weight.zero_()
            heads.content.bias.zero_()
            for b, it in enumerate(batch):
                right, which = binding.option_token_labels(vlm, it, "nothink", n_image[b])
                prompt_ids = vlm.prompt_ids(it, "nothink", n_image[b])
                mine = {prompt_ids[t] for t, w in enumerate(which) if w == pick(it)}
                others = {prompt_ids[t] for t, w in enumerate(which) if w >= 0 and w != pick(it)}
                heads.content.bias[sorted(mine - others)] = 10.0
        return binding.binding_loss(vlm, heads, cfg, extras, batch, "nothink")[1]["content"]

    right = favour(binding.answer_index)
    wrong = favour(lambda it: (binding.answer_index(it) + 1) % len(it.options))
    assert right < 0.5 < 3 < wrong, (right, wrong)
    _, parts = binding.binding_loss(vlm, binding.BindingHeads(TINY["hidden_size"]), binding.settings(True),
                                    extras, batch, "nothink")
    assert "content" not in parts and set(parts) == {"match", "letter", "attention", "pick"}


def test_scene_term_names_every_attribute_of_the_image(items, base_dir):
    """The scene term: one head per scene attribute on the letter position's state, classes from the
    training scenes; a label outside them or missing scenes is a clear error."""
    scenes = scenes_for(items)
    classes = binding.scene_classes(scenes)
    assert list(classes) == list(binding.pretrain.SCENE_ATTRIBUTES)
    assert all(c == sorted(set(c)) and c for c in classes.values())
    batch = items[:4]
    vlm, extras = _forward(base_dir, batch)
    cfg = binding.settings({"scene": 1.0})
    heads = binding.BindingHeads(TINY["hidden_size"], scene_classes=classes)
    _, parts = binding.binding_loss(vlm, heads, cfg, extras, batch, "nothink", scenes=scenes[:4])
    assert abs(parts["scene"] - sum(torch.log(torch.tensor(float(len(c)))) for c in classes.values()) / 6) < 0.5
    with pytest.raises(ValueError, match="scene term needs each item's scene"):
        binding.binding_loss(vlm, heads, cfg, extras, batch, "nothink")
    odd = [{**sc, "anatomy": "elbow"} for sc in scenes[:4]]
    with pytest.raises(ValueError, match="'anatomy' label 'elbow' is not one of"):
        binding.binding_loss(vlm, heads, cfg, extras, batch, "nothink", scenes=odd)


def _loop_loss(vlm, heads, cfg, extras, items, mode, scenes):
    """binding_loss written item by item, as it first was (the reference for the batched version)."""
    out, ids, lengths = extras["outputs"], extras["inputs"]["input_ids"], extras["lengths"]
    T = ids.shape[1]
    n_prefix = len(vlm.tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"])
    hidden, attn = out.hidden_states[cfg["layer"]], out.attentions[-1]
    image_id = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    xs, ys, lx, ly, att, con, scene, picks = [], [], [], [], [], [], [], 0
    for b, item in enumerate(items):
        right, which = binding.option_token_labels(vlm, item, mode, int((ids[b] == image_id).sum()))
        off, q = T - len(right) - lengths[b], T - lengths[b] + n_prefix - 1
        pos = [t for t, r in enumerate(right) if r >= 0]
        h = hidden[b, [off + t for t in pos]]
        z, y = heads.match(h).squeeze(-1), torch.tensor([float(right[t]) for t in pos])
        xs.append(z), ys.append(y), lx.append(heads.letter(h)), ly.append(torch.tensor([which[t] for t in pos]))
        picks += int(y[int(z.argmax())] == 1)
        mine = [off + t for t, r in enumerate(right) if r == 1]
        att.append(torch.stack([-torch.log(attn[b, k, q, mine].sum() + 1e-6) for k in cfg["head"]]).mean())
        logits = heads.content(hidden[b, q])
        scores = torch.stack([logits[ids[b, [off + t for t, w in enumerate(which) if w == o]]].mean()
                              for o in range(len(item.options))])
        con.append(torch.nn.functional.cross_entropy(scores[None], torch.tensor([binding.answer_index(item)])))
        lab = binding.pretrain.scene_labels(scenes[b])
        scene.append(torch.stack([torch.nn.functional.cross_entropy(
            head(hidden[b, q])[None], torch.tensor([heads.scene_classes[a].index(lab[a])]))
            for a, head in heads.scene.items()]))
    F = torch.nn.functional
    parts = {"match": F.binary_cross_entropy_with_logits(torch.cat(xs), torch.cat(ys)),
             "letter": F.cross_entropy(torch.cat(lx), torch.cat(ly)), "attention": torch.stack(att).mean(),
             "content": torch.stack(con).mean(), "scene": torch.stack(scene).mean(0).mean()}
    return sum(parts.values()), {**{k: float(v.detach()) for k, v in parts.items()}, "pick": picks / len(items)}


def test_batched_loss_equals_the_item_by_item_loss_and_its_gradients(items, base_dir):
    """binding_loss indexes the whole batch at once (for speed); its value, parts and gradients equal
    the item-by-item form's, on a batch with options of several tokens and items with fewer options."""
    it = items[5]
    keep = sorted({binding.answer_index(it), (binding.answer_index(it) + 1) % len(it.options)})
    two = dataclasses.replace(it, options=[it.options[i] for i in keep],
                              answer=prompts.LETTERS[keep.index(binding.answer_index(it))])
    batch = items[:5] + [two]
    assert len(two.options) == 2 < len(batch[0].options)
    scenes = scenes_for(batch)
    cfg = binding.settings({"content": 1.0, "scene": 1.0, "head": [0, 2]})
    vlm = models.load_vlm(base_dir)
    torch.manual_seed(0)
    heads = binding.BindingHeads(TINY["hidden_size"], vocab_size=_vocab_size(vlm),
                                 scene_classes=binding.scene_classes(scenes_for(items)))
    vlm.model.set_attn_implementation("eager")
    results = []
    for fn in (binding.binding_loss, _loop_loss):
        extras = {}
        vlm.sequence_nll(data.load_images(batch, size=SIZE), batch,
                         [sft_targets(it, None, "nothink") for it in batch], prompt="nothink", extras=extras)
        vlm.model.zero_grad(), heads.zero_grad()
        loss, parts = fn(vlm, heads, cfg, extras, batch, "nothink", scenes)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in [*vlm.model.named_parameters(), *heads.named_parameters()]
                 if p.grad is not None}
        results.append((float(loss.detach()), parts, grads))
    (loss, parts, grads), (ref_loss, ref_parts, ref_grads) = results
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) > 20  # the language model's weights and every head
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
