"""Soundness and behaviour of the randomized-smoothing certifier (safemed_lib.smoothing) and of its VLM
base classifiers and CERTIFY over items (safemed_lib.certify).

The reference point is a linear binary classifier f(x) = [w.x + b > 0]: its smoothed classifier
has pA = Phi(dist / sigma), so the exact certified radius is the distance to the hyperplane.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from safemed_lib import benchmark, certify as ce, smoothing as sm
from safemed_lib.smoothing import ABSTAIN, certified_accuracy, certify, max_certifiable_radius, predict

SHAPE = (1, 4, 4)
D = math.prod(SHAPE)


def linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    center = torch.full((D,), 0.5, dtype=torch.float64)
    b = -float(w @ center)  # the hyperplane passes through the centre of the [0,1] box

    def classify(batch):
        return (batch.flatten(1) @ w + b > 0).long()

    def signed_distance(x):
        return float((x.flatten() @ w + b) / w.norm())

    return w, b, classify, signed_distance


def point_at(w, b, dist, seed):
    """A point in [0,1]^D at signed distance ``dist`` from the hyperplane w.x + b = 0."""
    g = torch.Generator().manual_seed(1000 + seed)
    u = torch.rand(D, generator=g, dtype=torch.float64) * 0.2 + 0.4
    u = u - (u @ w + b) / w.norm() ** 2 * w          # project onto the plane
    return (u + dist * w / w.norm()).reshape(SHAPE)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pgd_l2(loss_fn, x, eps, steps=40):
    """PGD-L2 ascent on loss_fn within the eps-ball, staying in [0,1]: safemed_lib.attacks.pgd when
    the attacks module provides it, else the same algorithm written out (Madry et al.)."""
    try:
        from safemed_lib.attacks import pgd
    except ImportError:
        pgd = None
    if pgd is not None:
        return pgd(loss_fn, x, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm="l2",
                   random_start=False).detach()
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x + delta).sum(), delta)
        g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        delta = delta.detach() + 2.5 * eps / steps * grad / g_norm
        d_norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(eps / d_norm.clamp_min(1e-12), max=1.0)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


# ----------------------------------------------------------------------------- soundness

def test_certified_radius_never_exceeds_distance_to_hyperplane():
    sigma, n_certified = 0.25, 0
    for seed in range(4):
        w, b, classify, dist = linear_problem(seed)
        for i in range(30):
            d = (i % 15 - 7) * 0.05 + 0.01  # signed distances from -0.34 to 0.36
            x = point_at(w, b, d, seed * 100 + i)
            cls, radius = certify(classify, x, sigma=sigma, n0=32, n=400, alpha=0.001,
                                  batch_size=128, num_classes=2, generator=gen(seed * 100 + i))
            assert abs(dist(x) - d) < 1e-9
            if cls != ABSTAIN:
                n_certified += 1
                assert cls == int(d > 0)
                assert 0.0 <= radius <= abs(d)
            else:
                assert radius == 0.0
    assert n_certified > 60  # most points far enough from the plane are certified


def test_certified_radius_approaches_true_distance_as_n_grows():
    sigma, d = 0.25, 0.25                  # pA = Phi(1) = 0.841
    w, b, classify, _ = linear_problem(1)
    x = point_at(w, b, d, 7)
    gaps = {}
    for n in (100, 1000, 100_000):
        radii = [certify(classify, x, sigma=sigma, n0=100, n=n, alpha=0.001, batch_size=20_000,
                         num_classes=2, generator=gen(s))[1] for s in range(3)]
        assert max(radii) <= d
        gaps[n] = d - float(np.mean(radii))
    assert gaps[100] > gaps[1000] > gaps[100_000] > 0
    assert gaps[100] > 0.05               # n=100 is far from tight
    assert gaps[100_000] < 0.02 * d        # n=100k is within 2% of the exact radius


def test_pgd_l2_inside_radius_does_not_flip_exact_smoothed_linear_classifier():
    sigma = 0.25
    w, b, classify, dist = linear_problem(2)
    w32, wn = w.float(), float(w.norm())

    def smoothed_prob_class1(xb):         # exact P(f(x + d) = 1) for the linear classifier
        return torch.distributions.Normal(0.0, 1.0).cdf((xb.flatten(1) @ w32 + b) / (sigma * wn))

    for i, d in enumerate((0.2, -0.3, 0.45)):
        x = point_at(w, b, d, 50 + i)
        cls, radius = certify(classify, x, sigma=sigma, n0=100, n=10_000, alpha=0.001,
                              batch_size=5000, num_classes=2, generator=gen(i))
        assert cls == int(d > 0) and radius > 0.05
        sign = 1.0 if cls == 1 else -1.0
        loss = lambda xb: -sign * smoothed_prob_class1(xb)   # push towards the other class
        x32 = x.float().unsqueeze(0)
        x_adv = pgd_l2(loss, x32, eps=radius)
        assert float((x_adv - x32).norm()) <= radius + 1e-5
        assert int(smoothed_prob_class1(x_adv) > 0.5) == cls      # not flipped inside the radius
        x_far = pgd_l2(loss, x32, eps=abs(d) * 1.1)                # the attack has teeth beyond it
        assert int(smoothed_prob_class1(x_far) > 0.5) != cls


def test_pgd_l2_inside_radius_does_not_flip_smoothed_mlp():
    """A nonlinear base classifier: PGD-L2 on the expected softmax over noise (SmoothAdv-style)
    inside the certified radius leaves PREDICT's answer unchanged; outside it, it flips."""
    sigma = 0.25
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(D, 32), torch.nn.Tanh(),
                              torch.nn.Linear(32, 3))

    def classify(batch):
        return net(batch).argmax(1)

    x = torch.full(SHAPE, 0.5)
    x[0, :2] = 0.8
    cls, radius = certify(classify, x, sigma=sigma, n0=100, n=5000, alpha=0.001, batch_size=2500,
                          num_classes=3, generator=gen(0))
    assert cls != ABSTAIN and radius > 0.1
    noise = torch.randn((256, *SHAPE), generator=gen(1)) * sigma

    def loss(xb):                          # expected probability mass off the certified class
        p = torch.softmax(net((xb.unsqueeze(1) + noise).reshape(-1, *SHAPE)), -1).view(len(xb), -1, 3)
        return 1 - p[..., cls].mean(1)

    x_adv = pgd_l2(loss, x.unsqueeze(0), eps=0.9 * radius, steps=60)[0]
    assert float((x_adv - x).norm()) <= 0.9 * radius + 1e-5
    assert predict(classify, x_adv, sigma=sigma, n=20_000, alpha=0.001, batch_size=5000,
                   num_classes=3, generator=gen(2)) == cls
    x_far = pgd_l2(loss, x.unsqueeze(0), eps=4 * radius, steps=60)[0]
    assert predict(classify, x_far, sigma=sigma, n=20_000, alpha=0.001, batch_size=5000,
                   num_classes=3, generator=gen(2)) not in (cls,)


# ----------------------------------------------------------------------------- behaviour

def test_abstains_near_the_boundary_and_predicts_far_from_it():
    w, b, classify, _ = linear_problem(0)
    near = point_at(w, b, 0.002, 1)                     # pA ~ 0.503
    far = point_at(w, b, -0.4, 2)                       # pA ~ 0.95 for class 0
    kw = dict(sigma=0.25, alpha=0.001, batch_size=1000, num_classes=2)
    assert certify(classify, near, n0=100, n=2000, generator=gen(0), **kw) == (ABSTAIN, 0.0)
    assert predict(classify, near, n=2000, generator=gen(0), **kw) == ABSTAIN
    cls, radius = certify(classify, far, n0=100, n=2000, generator=gen(0), **kw)
    assert cls == 0 and 0.2 < radius <= 0.4
    assert predict(classify, far, n=2000, generator=gen(0), **kw) == 0


def test_uniformly_random_classifier_abstains():
    def classify(batch):
        return torch.arange(len(batch)) % 4
    x = torch.rand(SHAPE)
    kw = dict(sigma=0.5, alpha=0.001, batch_size=64, num_classes=4)
    assert certify(classify, x, n0=64, n=512, **kw) == (ABSTAIN, 0.0)
    assert predict(classify, x, n=512, **kw) == ABSTAIN


def test_constant_classifier_reaches_max_certifiable_radius():
    def classify(batch):
        return torch.full((len(batch),), 2)
    for n in (100, 1000):
        cls, radius = certify(classify, torch.rand(SHAPE), sigma=0.5, n0=10, n=n, alpha=0.001,
                              batch_size=300, num_classes=3)
        assert cls == 2 and radius == pytest.approx(max_certifiable_radius(0.5, n, 0.001))


@pytest.mark.parametrize("n, ratio", [(100, 1.50), (1000, 2.46), (100_000, 3.81)])
def test_max_certifiable_radius_matches_papers_numbers(n, ratio):
    assert max_certifiable_radius(1.0, n, 0.001) == pytest.approx(ratio, abs=0.006)
    assert max_certifiable_radius(0.25, n, 0.001) == pytest.approx(0.25 * ratio, abs=0.002)
    assert max_certifiable_radius(1.0, n, 0.001) == pytest.approx(norm.ppf(0.001 ** (1 / n)))


def test_noise_is_gaussian_in_pixel_space_unclamped_and_batched():
    x = torch.zeros(SHAPE)
    seen = []

    def classify(batch):
        seen.append(batch.clone())
        return torch.zeros(len(batch), dtype=torch.long)

    counts = sm.sample_counts(classify, x, 1000, sigma=0.3, batch_size=128, num_classes=2, generator=gen(0))
    assert counts.tolist() == [1000, 0]
    assert [len(s) for s in seen] == [128] * 7 + [104]
    noise = torch.cat(seen)
    assert noise.min() < -0.5                                   # not clamped to [0, 1]
    assert abs(float(noise.mean())) < 0.01
    assert float(noise.std()) == pytest.approx(0.3, rel=0.02)
    assert not torch.equal(seen[0][0], seen[0][1])               # fresh noise per sample


def test_seeded_generator_is_deterministic():
    w, b, classify, _ = linear_problem(0)
    x = point_at(w, b, 0.05, 3)
    kw = dict(sigma=0.25, n0=50, n=300, alpha=0.001, batch_size=64, num_classes=2)
    a = sm.certify_detail(classify, x, generator=gen(11), **kw)
    b2 = sm.certify_detail(classify, x, generator=gen(11), **kw)
    c = sm.certify_detail(classify, x, generator=gen(12), **kw)
    assert (a.prediction, a.radius) == (b2.prediction, b2.radius)
    assert np.array_equal(a.counts_estimation, b2.counts_estimation)
    assert not np.array_equal(a.counts_estimation, c.counts_estimation)
    assert predict(classify, x, n=300, sigma=0.25, alpha=0.01, batch_size=64, num_classes=2,
                   generator=gen(5)) == predict(classify, x, n=300, sigma=0.25, alpha=0.01,
                                                batch_size=64, num_classes=2, generator=gen(5))


# ----------------------------------------------------------------------------- errors

GOOD = dict(sigma=0.25, n0=10, n=20, alpha=0.001, batch_size=8, num_classes=2)


@pytest.mark.parametrize("key, value", [
    ("sigma", 0.0), ("sigma", -0.1), ("sigma", float("nan")), ("n0", 0), ("n", 0), ("n", 2.5),
    ("alpha", 0.0), ("alpha", 1.0), ("alpha", 1.5), ("batch_size", 0), ("num_classes", 1)])
def test_bad_parameters_raise_naming_the_parameter(key, value):
    def classify(batch):
        return torch.zeros(len(batch), dtype=torch.long)
    kw = {**GOOD, key: value}
    with pytest.raises(ValueError, match=key):
        certify(classify, torch.rand(SHAPE), **kw)
    if key != "n0":
        kw.pop("n0")
        with pytest.raises(ValueError, match=key):
            predict(classify, torch.rand(SHAPE), **kw)


def test_bad_input_and_bad_class_ids_raise():
    def ok(batch):
        return torch.zeros(len(batch), dtype=torch.long)
    with pytest.raises(ValueError, match="x must be one float image"):
        certify(ok, torch.rand(2, *SHAPE), **GOOD)
    with pytest.raises(ValueError, match="outside"):
        certify(lambda b: torch.full((len(b),), 2), torch.rand(SHAPE), **GOOD)
    with pytest.raises(ValueError, match="outside"):
        predict(lambda b: torch.full((len(b),), -1), torch.rand(SHAPE), sigma=0.25, n=20,
                alpha=0.01, batch_size=8, num_classes=2)
    with pytest.raises(ValueError, match="integer class ids"):
        certify(lambda b: torch.zeros(len(b)), torch.rand(SHAPE), **GOOD)
    with pytest.raises(ValueError, match="integer class ids"):
        certify(lambda b: torch.zeros(len(b), 2, dtype=torch.long), torch.rand(SHAPE), **GOOD)
    with pytest.raises(ValueError, match="n "):
        max_certifiable_radius(0.5, 0, 0.001)


# ----------------------------------------------------------------------------- certified accuracy

def test_certified_accuracy_counts_abstains_as_wrong():
    preds = [0, 1, ABSTAIN, 2, 1]
    radii = [0.5, 0.1, 0.0, 1.2, 0.7]
    labels = [0, 1, 2, 2, 0]
    acc = certified_accuracy(preds, radii, labels, [0.0, 0.25, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(acc, [3 / 5, 2 / 5, 2 / 5, 1 / 5, 0.0])
    with pytest.raises(ValueError, match="one length"):
        certified_accuracy([0, 1], [0.1], [0, 1], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        certified_accuracy([], [], [], [0.0])


def test_certified_accuracy_curves_and_summary_per_group():
    import pandas as pd
    df = pd.DataFrame({"modality": ["CT", "CT", "MRI", "MRI"], "label": [0, 1, 2, 0],
                       "pred": [0, ABSTAIN, 2, 3], "radius": [0.6, 0.0, 0.3, 0.9],
                       "base_pred": [0, 1, 2, 0], "n_options": [3, 3, 3, 3]})
    curves = sm.certified_accuracy_curves(df, [0.0, 0.5], by="modality")
    got = {(r.modality, r.radius): r.certified_accuracy for r in curves.itertuples()}
    assert got == {("CT", 0.0): 0.5, ("CT", 0.5): 0.5, ("MRI", 0.0): 0.5, ("MRI", 0.5): 0.0,
                   ("All", 0.0): 0.5, ("All", 0.5): 0.25}
    summary = sm.certified_summary(df, radii=(0.25, 0.5), by="modality")
    assert list(summary.index) == ["CT", "MRI", "All"]
    assert summary.loc["All", "abstain"] == 25.0 and summary.loc["All", "base_acc"] == 100.0
    assert summary.loc["All", "no_answer"] == 25.0 and summary.loc["CT", "no_answer"] == 0.0
    assert summary.loc["All", "smoothed_clean_acc"] == 50.0
    assert summary.loc["MRI", "cert_acc@0.25"] == 50.0 and summary.loc["MRI", "cert_acc@0.5"] == 0.0


# ----------------------------------------------------------------------------- VLM base classifiers (certify)

class BrightnessVLM:
    """A stand-in VLM whose answer depends on the image's mean brightness: option k is preferred
    near brightness (k + 0.5) / n_options; generate writes no valid answer when the brightness is
    below 0.1. Counts its calls so tests can see what was recomputed."""

    def __init__(self):
        self.model, self.device, self.calls = torch.nn.Identity(), "cpu", 0

    def option_logprobs(self, images, items, prompt="nothink"):
        self.calls += 1
        return self._scores(images, items)

    def _scores(self, images, items):
        out = []
        for img, it in zip(images, items):
            k = len(it.options)
            centers = (torch.arange(k) + 0.5) / k
            out.append(torch.log_softmax(-200 * (img.mean() - centers) ** 2, 0))
        return out

    def generate(self, images, items, prompt="nothink", max_new_tokens=64):
        self.calls += 1
        letters = [int(s.argmax()) for s in self._scores(images, items)]
        return ["no idea" if float(img.mean()) < 0.1 else f"<answer> {'ABCDE'[k]} </answer>"
                for img, k in zip(images, letters)]


def make_items(tmp_path, levels=(0.2, 0.5, 0.85, 0.05)):
    from PIL import Image
    from safemed_lib.data import VQAItem
    items = []
    for i, v in enumerate(levels):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((28, 28, 3), round(v * 255), dtype=np.uint8)).save(path)
        items.append(VQAItem(question_id=f"q{i}", dataset="toy", image_path=path, question="Which?",
                             options=["a", "b", "c"], answer="ABC"[min(int(v * 3), 2)],
                             modality=("CT", "MRI")[i % 2], question_type="Disease Diagnosis"))
    return items


def test_vlm_classifiers_map_answers_to_class_ids(tmp_path):
    vlm, items = BrightnessVLM(), make_items(tmp_path)
    imgs = torch.stack([torch.full((3, 28, 28), v) for v in (0.2, 0.5, 0.85, 0.05)])
    gen_ids = ce.generation_classifier(vlm, items[0], batch_size=3)(imgs)
    assert gen_ids.tolist() == [0, 1, 2, 3]                  # 3 = "no valid answer"
    assert vlm.calls == 2                                     # two chunks (3 + 1 images)
    assert ce.logprob_classifier(vlm, items[0])(imgs).tolist() == [0, 1, 2, 0]


def test_certify_items_resumes_from_records_without_recomputing(tmp_path):
    items = make_items(tmp_path)
    kw = dict(sigma=0.05, n0=16, n=64, alpha=0.01, image_size=None, batch_size=32, seed=3)
    full = ce.certify_items(BrightnessVLM(), items, method="generate", records_path=tmp_path / "a.jsonl", **kw)
    assert full["pred"].tolist() == [0, 1, 2, 3] and (full["radius"] > 0).all()
    assert full["correct"].tolist() == [True, True, True, False]    # "no valid answer" is wrong
    # a run killed after two items: its records hold only those two (plus a torn line)
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    vlm = BrightnessVLM()
    with pytest.warns(UserWarning, match="torn"):
        resumed = ce.certify_items(vlm, items, method="generate", records_path=tmp_path / "b.jsonl", **kw)
    per_item_calls = 1 + 1 + 2                 # base prediction, n0 in one batch, n in two batches
    assert vlm.calls == 2 * per_item_calls
    cols = ["question_id", "pred", "radius", "p_lower", "counts_estimation", "base_pred"]
    assert resumed[cols].equals(full[cols])
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="sigma=0.05 but this run has sigma=0.1"):
        ce.certify_items(BrightnessVLM(), items, method="generate", records_path=tmp_path / "b.jsonl",
                         **{**kw, "sigma": 0.1})
    with pytest.raises(ValueError, match="method"):
        ce.certify_items(BrightnessVLM(), items, method="sample", **kw)


def test_real_tiny_vlm_classifiers_and_certify(tmp_path):
    """The real (untrained) Qwen2-VL-architecture tiny model as base classifier: ids are in the
    class space, the fast path is the argmax of option_logprobs, generation ids follow
    parse_answer, and noisy (unclamped) images go through its preprocessing."""
    from safemed_lib import models
    from safemed_lib.prompts import LETTERS, parse_answer
    items = make_items(tmp_path, levels=(0.3,))
    item = items[0]
    vlm = models.build_tiny_vlm([item.question, *item.options], seed=0, hidden_size=64, image_size=56)
    x = torch.rand(3, 56, 56, generator=gen(0))
    noisy = x + 0.5 * torch.randn((4, 3, 56, 56), generator=gen(1))
    assert noisy.min() < 0 and noisy.max() > 1
    k = len(item.options)
    ids = ce.logprob_classifier(vlm, item)(noisy)
    with torch.no_grad():
        expect = [int(s.argmax()) for s in vlm.option_logprobs(noisy, [item] * 4, prompt="nothink")]
    assert ids.tolist() == expect and all(0 <= i < k for i in expect)
    gen_ids = ce.generation_classifier(vlm, item, prompt="nothink", max_new_tokens=6, batch_size=2)(noisy)
    texts = vlm.generate(noisy, [item] * 4, prompt="nothink", max_new_tokens=6)
    assert gen_ids.tolist() == [k if parse_answer(t, k) is None else LETTERS.index(parse_answer(t, k))
                                for t in texts]
    c = sm.certify_detail(ce.logprob_classifier(vlm, item), x, sigma=0.25, n0=8, n=16, alpha=0.001,
                          batch_size=8, num_classes=k + 1, generator=gen(2))
    assert c.counts_selection.sum() == 8 and c.counts_estimation.sum() == 16
    assert c.counts_estimation[k] == 0                         # the fast path never says "no answer"
    assert c.prediction == ABSTAIN or 0 <= c.prediction < k
    assert c.radius <= max_certifiable_radius(0.25, 16, 0.001) + 1e-12


def test_pick_items_round_robin_over_modalities(tmp_path):
    items = make_items(tmp_path, levels=(0.1, 0.2, 0.3, 0.4, 0.5))    # CT, MRI, CT, MRI, CT
    got = ce.pick_items(items, 3)
    assert [it.question_id for it in got] == ["q0", "q1", "q2"]
    assert [it.question_id for it in ce.pick_items(items, 10)] == ["q0", "q1", "q2", "q3", "q4"]
    assert [it.modality for it in ce.pick_items(items[:1] + items[2:], 2)] == ["CT", "MRI"]


def test_model_digest_tracks_weights_and_records_reject_another_model(tmp_path):
    vlm_a, vlm_b = BrightnessVLM(), BrightnessVLM()
    vlm_a.model = torch.nn.Linear(3, 2)
    vlm_b.model = torch.nn.Linear(3, 2)
    vlm_b.model.load_state_dict(vlm_a.model.state_dict())
    assert benchmark.model_digest(vlm_a.model) == benchmark.model_digest(vlm_b.model)
    with torch.no_grad():
        vlm_b.model.bias[0] += 1e-3
    assert benchmark.model_digest(vlm_a.model) != benchmark.model_digest(vlm_b.model)
    items = make_items(tmp_path, levels=(0.5,))
    kw = dict(sigma=0.1, n0=4, n=8, alpha=0.01, image_size=None, records_path=tmp_path / "r.jsonl")
    ce.certify_items(BrightnessVLM(), items, model_id="aaa", **kw)
    with pytest.raises(ValueError, match="model='aaa' but this run has model='bbb'"):
        ce.certify_items(BrightnessVLM(), items, model_id="bbb", **kw)


def test_smooth_adv_walks_to_the_plane_and_never_beats_a_certificate():
    """SmoothAdv on a soft linear classifier: the best L2 move is straight at the hyperplane, so the attacked
    point lies radius closer to it (in the ball, in [0,1]); points certified beyond the radius keep PREDICT's class."""
    from safemed_lib.smoothing import smooth_adv

    sigma, r = 0.25, 0.1
    w, b, classify, dist = linear_problem(2)

    def log_probs(batch):
        z = 8.0 * (batch.flatten(1) @ w + b) / w.norm()
        return torch.log_softmax(torch.stack([torch.zeros_like(z), z], 1), 1)

    checked = 0
    for i, d in enumerate((0.05, 0.2, 0.35, -0.2)):
        x = point_at(w, b, d, 500 + i)
        label = int(d > 0)
        x_adv = smooth_adv(log_probs, x, label, sigma=sigma, radius=r, steps=20, m=16, generator=gen(i))
        assert float((x_adv - x).norm()) <= r + 1e-9 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
        assert dist(x_adv) * (1 if d > 0 else -1) == pytest.approx(abs(d) - r, abs=0.01)  # may cross it
        cls, radius = certify(classify, x, sigma=sigma, n0=32, n=400, alpha=0.001, batch_size=128, num_classes=2,
                              generator=gen(50 + i))
        if cls == label and radius >= r:
            checked += 1
            assert predict(classify, x_adv, sigma=sigma, n=400, alpha=0.001, batch_size=128, num_classes=2,
                           generator=gen(90 + i)) in (label, ABSTAIN)
    assert checked >= 2
    with pytest.raises(ValueError, match="radius > 0"):
        smooth_adv(log_probs, x, 1, sigma=sigma, radius=0.0)


def test_early_abstention_returns_what_the_full_run_returns_with_fewer_draws():
    from safemed_lib.smoothing import certify_detail, lower_confidence_bound, min_count

    for n, alpha in ((100, 0.001), (1000, 0.001), (37, 0.05)):
        k = min_count(n, alpha)
        assert lower_confidence_bound(k, n, alpha) >= 0.5 > lower_confidence_bound(k - 1, n, alpha)
    assert min_count(5, 0.001) == 6                       # 5 draws can never certify at alpha 0.001

    w, b, classify, _ = linear_problem(3)
    for d, seed in ((0.0, 1), (0.02, 2), (0.3, 3)):       # on the plane, near it (abstain), far (certified)
        x = point_at(w, b, d, seed)
        kw = dict(sigma=0.25, n0=16, n=400, alpha=0.001, batch_size=50, num_classes=2)
        early = certify_detail(classify, x, generator=gen(seed), **kw)
        full = certify_detail(classify, x, generator=gen(seed), early_abstain=False, **kw)
        assert (early.prediction, early.radius) == (full.prediction, full.radius)
        assert full.counts_estimation.sum() == 400
        if early.prediction == ABSTAIN:
            assert early.counts_estimation.sum() < 400 and early.p_lower < 0.5
        else:
            assert early.counts_estimation.tolist() == full.counts_estimation.tolist() and d == 0.3
