"""Tests for safemed_lib.attacks: the PGD core against a textbook loop, and the VLM attack hook; and for
safemed_lib.benchmark's attack grid, sweep and model digest."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from safemed_lib.attacks import fgsm, pgd, round_8bit


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.fixture
def setup():
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 12, 12, generator=g)
    x[0, :, :3] = 0.0  # pixels on the box boundary, so the clamp matters
    x[1, :, -3:] = 1.0
    y = torch.randint(0, 5, (6,), generator=g)
    loss_fn = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    return model, x, y, loss_fn


def madry_linf(model, x, y, eps, alpha, steps, start=None):
    """Textbook L-inf PGD (Madry et al. 2018), written out as in the usual reference code."""
    x_adv = x.clone().detach() if start is None else start.clone().detach()
    for _ in range(steps):
        x_adv.requires_grad = True
        loss = F.cross_entropy(model(x_adv), y)  # mean reduction: the sign is unchanged
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0, 1).detach()
    return x_adv


def madry_l2(model, x, y, eps, alpha, steps):
    """Textbook L2 PGD: normalized-gradient step, then projection on the L2 ball, then clamp."""
    x_adv = x.clone().detach()
    for _ in range(steps):
        x_adv.requires_grad = True
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x_adv)
        gn = grad.view(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = x_adv.detach() + alpha * grad / (gn + 1e-12)
        delta = x_adv - x
        dn = delta.view(len(x), -1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / (dn + 1e-12), max=1.0)
        x_adv = torch.clamp(x + delta, 0, 1).detach()
    return x_adv


def test_linf_reproduces_madry_iterates_exactly(setup):
    model, x, y, loss_fn = setup
    for steps in (1, 3, 10):
        ours = pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=False)
        ref = madry_linf(model, x, y, 8 / 255, 2 / 255, steps)
        assert torch.equal(ours, ref), f"steps={steps}: max diff {(ours - ref).abs().max()}"


def test_linf_random_start_matches_textbook_with_same_generator(setup):
    model, x, y, loss_fn = setup
    eps = 8 / 255
    ours = pgd(loss_fn, x, eps=eps, alpha=2 / 255, steps=5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    start = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps, generator=g), 0, 1)
    assert torch.equal(ours, madry_linf(model, x, y, eps, 2 / 255, 5, start=start))


def test_l2_reproduces_textbook_iterates(setup):
    model, x, y, loss_fn = setup
    ours = pgd(loss_fn, x, eps=0.5, alpha=0.1, steps=7, norm="l2", random_start=False)
    ref = madry_l2(model, x, y, 0.5, 0.1, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 4 / 255, 1 / 255), ("l2", 0.3, 0.08)])
@pytest.mark.parametrize("random_start", [False, True])
def test_stays_in_ball_and_box(setup, norm, eps, alpha, random_start):
    _, x, _, loss_fn = setup
    x_adv = pgd(loss_fn, x, eps=eps, alpha=alpha, steps=12, norm=norm, random_start=random_start,
                generator=torch.Generator().manual_seed(0), restarts=2)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size
    assert (size > 0.5 * eps).all(), "the attack should use a good part of its budget"


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 1.0, 0.25)])
def test_increases_the_loss(setup, norm, eps, alpha):
    _, x, _, loss_fn = setup
    x_adv, trace = pgd(loss_fn, x, eps=eps, alpha=alpha, steps=10, norm=norm, random_start=False,
                       return_trace=True)
    with torch.no_grad():
        clean, adv = loss_fn(x), loss_fn(x_adv)
    assert (adv > clean).all(), (clean, adv)
    assert trace.shape == (1, 11, len(x))
    torch.testing.assert_close(trace[0, 0], clean)
    torch.testing.assert_close(trace[0, -1], adv)


def test_restarts_keep_the_best_per_example(setup):
    _, x, _, loss_fn = setup
    x_adv, trace = pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=3, restarts=4,
                       generator=torch.Generator().manual_seed(3), return_trace=True)
    with torch.no_grad():
        final = loss_fn(x_adv)
    torch.testing.assert_close(final, trace[:, -1].max(dim=0).values)
    # more than one restart wins somewhere, else the test does not exercise the selection
    assert len(set(trace[:, -1].argmax(dim=0).tolist())) > 1


def test_deterministic_with_seeded_generator(setup):
    _, x, _, loss_fn = setup
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        a = pgd(loss_fn, x, eps=eps, alpha=eps / 4, steps=4, norm=norm, generator=torch.Generator().manual_seed(5))
        b = pgd(loss_fn, x, eps=eps, alpha=eps / 4, steps=4, norm=norm, generator=torch.Generator().manual_seed(5))
        c = pgd(loss_fn, x, eps=eps, alpha=eps / 4, steps=4, norm=norm, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_l2_random_start_is_inside_the_ball(setup):
    _, x, _, _ = setup
    zero = lambda z: z.flatten(1).sum(1) * 0.0  # noqa: E731  zero gradient: PGD stays at the start
    x_adv = pgd(zero, torch.full_like(x, 0.5), eps=0.2, alpha=0.1, steps=1, norm="l2",
                generator=torch.Generator().manual_seed(0))
    size = (x_adv - 0.5).flatten(1).norm(dim=1)
    assert (size <= 0.2 + 1e-6).all() and (size > 0.1).all()  # uniform in a d=432 ball: radius ~ eps


def test_fgsm_is_one_pgd_step(setup):
    model, x, y, loss_fn = setup
    for norm in ("linf", "l2"):
        eps = 8 / 255 if norm == "linf" else 0.5
        a = fgsm(loss_fn, x, eps=eps, norm=norm)
        b = pgd(loss_fn, x, eps=eps, alpha=eps, steps=1, norm=norm, random_start=False)
        assert torch.equal(a, b)
    assert torch.equal(fgsm(loss_fn, x, eps=8 / 255), madry_linf(model, x, y, 8 / 255, 8 / 255, 1))


def test_eps_zero_returns_the_clean_batch(setup):
    _, x, _, loss_fn = setup
    assert torch.equal(pgd(loss_fn, x, eps=0.0, alpha=0.01, steps=3), x)


def test_works_under_no_grad_and_leaves_input_alone(setup):
    _, x, _, loss_fn = setup
    x0 = x.clone()
    with torch.no_grad():
        x_adv = pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)
    assert torch.equal(x, x0) and not torch.equal(x_adv, x)


def test_callback_sees_every_step(setup):
    _, x, _, loss_fn = setup
    seen = []
    pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=4, restarts=2, generator=torch.Generator().manual_seed(0),
        callback=lambda r, t, xa, loss: seen.append((r, t, tuple(loss.shape))))
    assert seen == [(r, t, (len(x),)) for r in range(2) for t in range(4)]


@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"), (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(norm="l1"), "norm"), (dict(restarts=0), "restarts"),
])
def test_bad_parameters_are_named(setup, kwargs, name):
    _, x, _, loss_fn = setup
    args = dict(eps=0.03, alpha=0.01, steps=2) | kwargs
    with pytest.raises(ValueError, match=name):
        pgd(loss_fn, x, **args)


def test_bad_images_are_rejected(setup):
    _, x, _, loss_fn = setup
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        pgd(loss_fn, x * 255, eps=0.03, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        pgd(loss_fn, x - 0.5, eps=0.03, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="floating"):
        pgd(loss_fn, (x * 255).to(torch.uint8), eps=0.03, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="per example"):
        pgd(lambda z: loss_fn(z).mean(), x, eps=0.03, alpha=0.01, steps=1)


def test_round_8bit():
    x = torch.tensor([0.0, 0.5, 1.0, 0.1234, 1 / 255 + 1e-4])
    r = round_8bit(x)
    assert torch.equal(r * 255, torch.round(r * 255))
    assert (r - x).abs().max() <= 0.5 / 255 + 1e-7


# ----------------------------------------------------------------------------- the VLM attack
import numpy as np  # noqa: E402

from safemed_lib import attacks, benchmark, data, evaluate, prompts  # noqa: E402
from safemed_lib.records import Records  # noqa: E402
from unit_vqa import assert_gradient_is_the_derivative, tiny_vlm, vqa_items  # noqa: E402


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return vqa_items(tmp_path_factory.mktemp("imgs"))


def test_answer_targets(vlm, vqa):
    items, images = vqa
    t, k = attacks.answer_targets(vlm, items, prompt="nothink")
    assert t == ["<answer> A </answer>", "<answer> B </answer>", "<answer> C </answer>"] and k == ["answer"] * 3
    outs = {"q0": "<think> a dark spot </think>\n<answer> C </answer>", "q1": "rambling text <answer> A </answer>",
            "q2": "<answer> B </answer>"}
    t, k = attacks.answer_targets(vlm, items, prompt="think", clean_outputs=outs)
    assert t[0] == prompts.format_completion("A", "think", "a dark spot")  # the model's reasoning, the TRUE answer
    assert t[1] == prompts.format_completion("B", "think", "rambling text")
    assert t[2] == "<answer> C </answer>" and k == ["clean_reasoning", "clean_reasoning", "answer"]
    with pytest.raises(ValueError, match="clean_outputs"):
        attacks.answer_targets(vlm, items, prompt="think", clean_outputs={"q0": "x"})
    # missing outputs are generated once on the clean images
    t, k = attacks.answer_targets(vlm, items[:1], prompt="think", clean_images=images[:1], max_new_tokens=4)
    assert len(t) == 1 and t[0].endswith("<answer> A </answer>")
    with pytest.raises(ValueError, match="target"):
        attacks.answer_targets(vlm, items, prompt="nothink", target="logits")


def test_vlm_loss_is_the_answer_nll_on_raw_pixels(vlm, vqa):
    items, images = vqa
    loss_fn = attacks.vlm_answer_loss(vlm, items, prompt="nothink")
    with torch.no_grad():
        want = vlm.sequence_nll(images, items, ["<answer> A </answer>", "<answer> B </answer>",
                                                "<answer> C </answer>"], prompt="nothink", reduction="sum")
        torch.testing.assert_close(loss_fn(images), want)
    x = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    assert g.shape == images.shape and (g != 0).float().mean() > 0.9  # every raw pixel matters


def test_vlm_loss_gradient_is_the_derivative_on_raw_pixels(vlm):
    """Finite differences of the answer loss along its gradient, in raw [0,1] pixel space, match the
    gradient's norm: the attack differentiates the loss of the image itself, end to end."""
    items = [data.VQAItem(question_id=f"g{i}", dataset="unit", image_path="/nonexistent.png",
                          question="What imaging technique was used?", options=["CT scan", "MRI", "X-ray"],
                          answer="AB"[i], modality="CT", question_type="Modality Recognition") for i in range(2)]
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert_gradient_is_the_derivative(attacks.vlm_answer_loss(vlm, items, prompt="nothink"), x, h=0.03, rtol=0.01)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_on_the_vlm_raises_the_answer_loss(vlm, vqa, norm, eps):
    items, images = vqa
    loss_fn = attacks.vlm_answer_loss(vlm, items, prompt="nothink")
    x_adv = attacks.pgd(loss_fn, images, eps=eps, alpha=eps / 4, steps=5, norm=norm, random_start=False)
    with torch.no_grad():
        assert (loss_fn(x_adv) > loss_fn(images)).all()
    d = (x_adv - images).flatten(1)
    assert ((d.abs().amax(1) if norm == "linf" else d.norm(dim=1)) <= eps + 1e-6).all()


def test_round_8bit_toward_stays_in_the_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 255
    x_adv = attacks.pgd(lambda z: (z * torch.linspace(-1, 1, z[0].numel()).view(z[0].shape)).flatten(1).sum(1),
                        x, eps=0.3, alpha=0.1, steps=3, norm="l2", random_start=False)
    r = attacks.round_8bit_toward(x_adv, x)
    assert evaluate.is_8bit(r) == [True] * 4 and r.min() >= 0 and r.max() <= 1
    assert ((r - x).flatten(1).norm(dim=1) <= (x_adv - x).flatten(1).norm(dim=1) + 1e-6).all()
    x_adv2 = (x + 2 / 255 * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)  # exactly 2 grey levels
    assert torch.equal(attacks.round_8bit_toward(x_adv2, x), torch.round(x_adv2 * 255) / 255)


def test_pgd_perturb_in_evaluate_end_to_end(vlm, vqa, tmp_path):
    items, _ = vqa
    hook = attacks.pgd_perturb(vlm, prompt="nothink", eps=8 / 255, steps=3, seed=1)
    df = evaluate.evaluate(vlm, items, prompt="nothink", image_size=56, perturb=hook, batch_size=3,
                           max_new_tokens=6, records_path=tmp_path / "adv.jsonl")
    assert df["rounded_8bit"].all() and df["perturbed"].all()
    assert (df["attack_linf"] <= 8 / 255 + 1e-6).all() and (df["attack_linf"] > 0).all()
    assert (df["attack_loss_adv"] > df["attack_loss_clean"]).all()
    assert set(df["attack_alpha"]) == {attacks.default_alpha(8 / 255, 3)}
    # per-item seeds: batching does not change the attack
    df1 = evaluate.evaluate(vlm, items, prompt="nothink", image_size=56, perturb=hook, batch_size=1, max_new_tokens=6)
    np.testing.assert_allclose(df1["attack_loss_adv"], df["attack_loss_adv"], rtol=1e-4)
    assert len(Records(tmp_path / "adv.jsonl").load()) == 3


def test_pgd_perturb_think_uses_clean_outputs(vlm, vqa):
    items, images = vqa
    outs = {it.question_id: "<think> bright area </think>\n<answer> A </answer>" for it in items}
    hook = attacks.pgd_perturb(vlm, prompt="think", eps=4 / 255, steps=2, clean_outputs=outs, rounding=False)
    x_adv, extras = hook(images, items)
    assert [e["attack_target"] for e in extras] == ["clean_reasoning"] * 3
    assert not all(evaluate.is_8bit(x_adv))
    assert all(e["attack_loss_adv"] > e["attack_loss_clean"] for e in extras)


def test_pgd_perturb_eps_zero_and_errors(vlm, vqa):
    items, images = vqa
    x, extras = attacks.pgd_perturb(vlm, prompt="nothink", eps=0.0)(images, items)
    assert torch.equal(x, images) and all(e["attack_linf"] == 0 for e in extras)
    for kwargs, name in [(dict(eps=-1 / 255), "eps"), (dict(eps=0.1, norm="l3"), "norm"),
                         (dict(eps=0.1, steps=0), "steps"), (dict(eps=0.1, target="x"), "target"),
                         (dict(eps=0.1, alpha=0.0), "alpha")]:
        with pytest.raises(ValueError, match=name):
            attacks.pgd_perturb(vlm, prompt="nothink", **kwargs)


def test_attack_grid():
    grid = benchmark.attack_grid()
    linf8 = next(g for g in grid if g["name"] == "linf_8")
    assert linf8["eps"] == 8 / 255 and linf8["alpha"] == pytest.approx(2 / 255) and linf8["steps"] == 10
    assert [g["eps"] for g in grid if g["norm"] == "l2"] == [0.25, 0.5, 1.0]


def test_evaluate_attacks_resumes_and_tabulates(vlm, vqa, tmp_path):
    items, _ = vqa
    grid = benchmark.attack_grid(linf_eps=(4,), l2_eps=(0.5,), steps=2)
    kw = dict(prompt="think", image_size=56, grid=grid, records_dir=tmp_path, tag="m", max_new_tokens=5, batch_size=2)
    df = benchmark.evaluate_attacks(vlm, items, **kw)
    assert sorted(set(df["attack"])) == ["clean", "l2_0.5", "linf_4"] and len(df) == 9
    assert set(df.loc[df.attack != "clean", "rounded_8bit"]) == {True}
    files = sorted(p.name.rsplit("_", 1)[0] for p in tmp_path.iterdir())
    assert files == ["m_clean", "m_l2_0.5", "m_linf_4"]
    # a second call only reads the records (drop one record: exactly that item is recomputed)
    (linf,) = tmp_path.glob("m_linf_4_*.jsonl")
    lines = linf.read_text().splitlines()
    linf.write_text("\n".join(lines[:2]) + "\n")
    df2 = benchmark.evaluate_attacks(vlm, items, **kw)
    assert len(linf.read_text().splitlines()) == 3 and len(list(tmp_path.iterdir())) == 3
    assert list(df2["pred"]) == list(df["pred"]) and list(df2["output"]) == list(df["output"])
    np.testing.assert_allclose(df2["attack_loss_adv"].fillna(0), df["attack_loss_adv"].fillna(0), rtol=1e-4)
    tab = benchmark.sweep_table(df)
    assert list(tab["eps_label"]) == ["0", "4/255", "0.5"] and (tab["n"] == 3).all()
    assert tab["accuracy"].between(0, 100).all()
    with pytest.raises(ValueError, match="unique"):
        benchmark.evaluate_attacks(vlm, items, **(kw | {"grid": grid + grid[:1]}))
    # other settings (here: steps) never reuse these records; the records_dir belongs to one model
    # (file names carry no weights digest: another model gets another directory, see evaluate.cached)
    benchmark.evaluate_attacks(vlm, items, **(kw | {"grid": benchmark.attack_grid(linf_eps=(4,), l2_eps=(), steps=1)}))
    assert len(list(tmp_path.glob("m_linf_4_*.jsonl"))) == 2 and len(list(tmp_path.glob("m_clean_*"))) == 1


def test_model_digest_changes_with_the_weights(vlm):
    d = benchmark.model_digest(vlm.model)
    p = next(vlm.model.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p[0] += 1e-3
        assert benchmark.model_digest(vlm.model) != d
        p.copy_(saved)
    assert benchmark.model_digest(vlm.model) == d
