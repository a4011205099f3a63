"""Tests for safemed_lib.viz: real demo images, one attack's view, the static panels, the app."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from safemed_lib import data, models, viz


@pytest.fixture(scope="module")
def vlm():
    corpus = ["What imaging modality was used to acquire this image? A)CT scan, B)MRI, C)X-ray",
              "The image shows a bright region, so it is a fundus photograph."] * 5
    return models.build_tiny_vlm(corpus, seed=0, image_size=56, hidden_size=64, vocab_size=600)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return viz.real_image_items(56, out_dir=tmp_path_factory.mktemp("demo"), seed=0)


def test_real_image_items(real, tmp_path):
    mods = {it.modality for it in real}
    assert {"Fundus", "Microscopy", "CT", "MRI"} <= mods  # skimage and pydicom ship these
    for it in real:
        im = Image.open(it.image_path)
        assert im.size == (56, 56) and im.mode == "RGB"
        assert it.answer_text == viz.synth.MODALITY_OPTION[it.modality] and len(set(it.options)) == 4
        x = data.load_image(it.image_path)  # on the grid, no resize needed
        assert x.std() > 0.02, f"{it.question_id} looks blank"
    again = viz.real_image_items(56, out_dir=real[0].image_path.parents[1], seed=0)
    assert [(i.options, i.answer) for i in again] == [(i.options, i.answer) for i in real]
    with pytest.raises(ValueError, match="multiple of 28"):
        viz.real_image_items(50, out_dir=tmp_path)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_run_attack_view(vlm, real, norm, eps):
    v = viz.run_attack(vlm, real[0], prompt="nothink", image_size=56, eps=eps, steps=3, norm=norm,
                       max_new_tokens=6, model_name="tiny")
    assert v.clean.shape == v.adv.shape == (3, 56, 56)
    size = v.delta.abs().max() if norm == "linf" else v.delta.norm()
    assert 0 < size <= eps + 1e-6
    assert torch.equal(torch.round(v.adv * 255) / 255, v.adv)  # rounded to 8 bits
    assert v.trace.shape == (1, 4) and v.trace[0, -1] > v.trace[0, 0]
    assert isinstance(v.clean_output, str) and isinstance(v.adv_output, str)
    assert "tiny" in v.summary() and ("8/255" in v.summary() or "0.5" in v.summary())


def test_attack_figure_has_all_panels(vlm, real, tmp_path):
    v = viz.run_attack(vlm, real[1], prompt="think", image_size=56, eps=4 / 255, steps=2, max_new_tokens=6,
                       clean_output="<think> pink stained tissue </think>\n<answer> A </answer>")
    assert v.target_kind == "clean_reasoning"
    fig = viz.attack_figure(v)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("clean") and titles[1].startswith("perturbation x")
    assert titles[2].startswith("adversarial") and titles[3] == "loss per step"
    texts = " ".join(t.get_text() for t in fig.axes[4].texts)
    assert "CLEAN output" in texts and "ADVERSARIAL output" in texts and "pink stained tissue" in texts
    png = viz.figure_png(fig)
    (tmp_path / "f.png").write_bytes(png)
    assert Image.open(tmp_path / "f.png").size[0] > 500


def test_attack_app_rerenders_on_changes(vlm, real):
    app = viz.attack_app({"tiny nothink": (vlm, "nothink"), "tiny think": (vlm, "think")}, real[:2],
                         image_size=56, steps=2, max_new_tokens=4)
    c = app.controls
    first = c["image"].value
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and app.view.eps == pytest.approx(8 / 255)
    c["eps"].value = 2 / 255
    assert app.view.eps == pytest.approx(2 / 255) and c["image"].value != first
    assert "2/255" in c["status"].value
    c["norm"].value = "l2"
    assert app.view.norm == "l2" and app.view.eps == pytest.approx(1.0)
    c["model"].value = "tiny think"
    assert app.view.prompt == "think"
    c["item"].value = 1
    assert app.view.item.question_id == real[1].question_id
    with pytest.raises(ValueError, match="at least one"):
        viz.attack_app({}, real, image_size=56)
