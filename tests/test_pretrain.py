"""The tiny base's in-context copying pretraining (safemed_lib.pretrain)."""
import pytest
import torch

from safemed_lib import models, pretrain

CORPUS = ["Which imaging modality is shown? A)CT scan, B)MRI, C)X-ray", "The image shows a bright ring."]


def test_copy_batch_repeats_each_row_and_skips_special_tokens():
    ids = pretrain.copy_batch(100, 4, 7, torch.Generator().manual_seed(0), low=16)
    assert ids.shape == (4, 14) and torch.equal(ids[:, :7], ids[:, 7:])
    assert int(ids.min()) >= 16 and int(ids.max()) < 100
    with pytest.raises(ValueError, match="low=99"):
        pretrain.copy_batch(100, 1, 3, torch.Generator(), low=99)


def test_copy_pretraining_teaches_copying_and_is_deterministic():
    def run():
        vlm = models.build_tiny_vlm(CORPUS, seed=0, hidden_size=64, image_size=56, vocab_size=400)
        return vlm, pretrain.copy_pretrain(vlm, 200, seed=3)

    vlm, log = run()
    assert log[0]["step"] == 50 and log[-1]["step"] == 200
    assert log[-1]["copy_accuracy"] >= 0.9, log  # untrained: about 1/vocab
    assert log[-1]["loss"] < log[0]["loss"]
    ids = pretrain.copy_batch(vlm.model.config.text_config.vocab_size, 8, 24, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = vlm.model(input_ids=ids).logits[:, 24:-1].argmax(-1)
    assert (pred == ids[:, 25:]).float().mean() >= 0.9  # fresh sequences: it copies, not memorizes
    _, again = run()
    assert again == log
    with pytest.raises(ValueError, match="steps"):
        pretrain.copy_pretrain(vlm, 0)


def test_scene_labels_reads_every_attribute_and_names_a_broken_scene():
    scene = {"image": "Images/Synth-CT/x.png", "modality": "CT", "anatomy": "pelvis", "finding": "cyst", "grade": 2,
             "count": 1, "style": None, "lesions": [{"quadrant": "lower right"}]}
    assert pretrain.scene_labels(scene) == {"modality": "CT", "anatomy": "pelvis", "finding": "cyst", "grade": "2",
                                            "count": "1", "style": "none"}
    assert pretrain.scene_labels({k: v for k, v in scene.items() if k != "anatomy"})["anatomy"] == "none"
    with pytest.raises(ValueError, match=r"Images/Synth-CT/x.png: missing \['modality'\]"):
        pretrain.scene_labels({k: v for k, v in scene.items() if k != "modality"})


def test_scene_quadrants_marks_every_lesion_and_names_a_bad_one():
    scene = {"image": "Images/Synth-CT/x.png", "modality": "CT",
             "lesions": [{"quadrant": "lower right"}, {"quadrant": "upper left"}]}
    assert pretrain.scene_quadrants(scene) == [1.0, 0.0, 0.0, 1.0]
    assert pretrain.scene_quadrants({**scene, "lesions": []}) == [0.0] * 4
    with pytest.raises(ValueError, match=r"Images/Synth-CT/x.png: lesion quadrant 'middle'"):
        pretrain.scene_quadrants({**scene, "lesions": [{"quadrant": "middle"}]})
    with pytest.raises(ValueError, match=r"missing \['lesions'\]"):
        pretrain.scene_quadrants({"image": "x.png", "modality": "CT"})


def _two_class_images(n=32, size=56):
    """Dark images labelled "dark", bright ones "bright", with a second, independent attribute."""
    g = torch.Generator().manual_seed(0)
    bright = torch.arange(n) % 2 == 1
    images = torch.rand(n, 3, size, size, generator=g) * 0.3 + bright.view(-1, 1, 1, 1) * 0.6
    labels = [{"tone": "bright" if b else "dark", "noise": str(i % 3)} for i, b in enumerate(bright.tolist())]
    return images, labels


def test_vision_pretraining_teaches_the_tower_only_and_is_deterministic():
    images, labels = _two_class_images()

    def run():
        vlm = models.build_tiny_vlm(CORPUS, seed=0, hidden_size=64, image_size=56, vocab_size=400)
        before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
        return vlm, before, pretrain.vision_pretrain(vlm, images, labels, 60, seed=1, batch_size=16)

    vlm, before, log = run()
    assert [r["step"] for r in log] == [60] and log[-1]["accuracy"] >= 0.6  # tone learnt, noise at chance
    changed = {k for k, v in vlm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert any("merger" in k for k in changed)
    tokens = pretrain.image_tokens(vlm, images[:4])
    assert tokens.shape == (4, 4, 64)  # 56 px: 4x4 patches, merged 2x2
    assert all(p.grad is None for p in vlm.model.parameters())
    _, _, again = run()
    assert again == log


def _blob_images(n=64, size=56):
    """A bright square in one of the four quadrants of a dark image; where = its quadrant, one-hot."""
    g = torch.Generator().manual_seed(0)
    quad = torch.arange(n) % 4
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    h = size // 2
    for i, q in enumerate(quad.tolist()):
        y, x = (q // 2) * h, (q % 2) * h
        images[i, :, y + 6:y + h - 6, x + 6:x + h - 6] = 0.9
    where = torch.nn.functional.one_hot(quad, 4).float()
    return images, [{"tone": "any"} for _ in range(n)], where


def test_vision_pretraining_teaches_where_and_token_positions():
    images, labels, where = _blob_images()

    def run():
        vlm = models.build_tiny_vlm(CORPUS, seed=0, hidden_size=64, image_size=56, vocab_size=400)
        return vlm, pretrain.vision_pretrain(vlm, images, labels, 300, seed=1, batch_size=16, where=where,
                                             position_weight=1.0)

    vlm, log = run()
    assert {"where_accuracy", "position_accuracy"} <= set(log[-1]), log[-1]
    assert log[-1]["position_accuracy"] >= 0.9, log  # each of the 2x2 merged tokens names its row and column
    assert log[-1]["where_accuracy"] >= 0.9, log  # the quadrant of the blob, through attention pooling
    assert all(p.grad is None for p in vlm.model.parameters())
    _, again = run()
    assert again == log
    with pytest.raises(ValueError, match=r"where must be a 0/1 tensor of shape \(64, K\)"):
        pretrain.vision_pretrain(vlm, images, labels, 5, where=where[:3])
    with pytest.raises(ValueError, match="where must be a 0/1"):
        pretrain.vision_pretrain(vlm, images, labels, 5, where=where * 2)
    with pytest.raises(ValueError, match="position_weight"):
        pretrain.vision_pretrain(vlm, images, labels, 5, position_weight=-1)


def test_attention_pool_ignores_token_order():
    pool = pretrain.AttentionPool(16, queries=2, heads=4)
    tokens = torch.randn(3, 5, 16)
    out = pool(tokens)
    assert out.shape == (3, 32)
    assert torch.allclose(out, pool(tokens[:, torch.randperm(5)]), atol=1e-6)  # no position inside the pool


def test_vision_pretraining_rejects_bad_labels():
    vlm = models.build_tiny_vlm(CORPUS, seed=0, hidden_size=64, image_size=56, vocab_size=400)
    images, labels = _two_class_images(4)
    with pytest.raises(ValueError, match="4 images but 3 label rows"):
        pretrain.vision_pretrain(vlm, images, labels[:3], 5)
    with pytest.raises(ValueError, match="keys"):
        pretrain.vision_pretrain(vlm, images, labels[:3] + [{"tone": "dark"}], 5)
    with pytest.raises(ValueError, match="steps"):
        pretrain.vision_pretrain(vlm, images, labels, 0)
