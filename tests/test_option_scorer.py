"""models.OptionScorer: the answer-only fast path equals VLM.option_logprobs, and its embedding-space noise
has the law of pixel noise (so CERTIFY's guarantee carries over)."""
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from safemed_lib import certify as ce
from safemed_lib import smoothing as sm
from safemed_lib.data import VQAItem
from safemed_lib.models import OptionScorer, build_tiny_vlm, option_scorer


def gen(seed):
    return torch.Generator().manual_seed(seed)


def item(options=("a lesion", "no lesion", "a cyst", "a mass")):
    return VQAItem(question_id="q0", dataset="toy", image_path="/nonexistent/unused.png", question="What is shown in the image?",
                   options=list(options), answer="A", modality="CT", question_type="Disease Diagnosis")


@pytest.fixture(scope="module")
def vlm():
    it = item()
    return build_tiny_vlm([it.question, *it.options], seed=0, hidden_size=64, image_size=56)


@pytest.mark.parametrize("prompt", ["nothink", "think_after"])
def test_logprobs_equal_option_logprobs_with_gradients(vlm, prompt):
    it = item()
    x = torch.rand(5, 3, 56, 56, generator=gen(0)) + 0.5 * torch.randn(5, 3, 56, 56, generator=gen(1))
    assert x.min() < 0 and x.max() > 1                       # unclamped noise goes through both
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.stack(vlm.option_logprobs(xa, [it] * 5, prompt=prompt))
    got = OptionScorer(vlm, it, prompt).logprobs(xb)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    (ref * torch.arange(4)).sum().backward()
    (got * torch.arange(4)).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", [1, 3])
def test_logprobs_equal_for_other_depths(layers):
    it = item(("yes", "no"))
    v = build_tiny_vlm([it.question, *it.options], seed=1, hidden_size=64, layers=layers, image_size=56)
    x = torch.rand(3, 3, 56, 56, generator=gen(2))
    with torch.no_grad():
        ref = torch.stack(v.option_logprobs(x, [it] * 3))
        got = OptionScorer(v, it).logprobs(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_embedding_noise_is_pixel_noise_seen_by_the_patch_embedding(vlm):
    """The patch embedding is affine in the pixels, and L L^T = sigma^2 W W^T: so E(x) + z L^T with z ~ N(0, I)
    has the law of E(x + d), d ~ N(0, sigma^2 I) (a Gaussian is fixed by its mean and covariance)."""
    s = OptionScorer(vlm, item())
    x = torch.rand(1, 3, 56, 56, generator=gen(3))
    d = torch.randn(1, 3, 56, 56, generator=gen(4))
    with torch.no_grad():
        torch.testing.assert_close(s.embed(x + d) - s.embed(x), s.patches(d) @ s.w.T, atol=1e-4, rtol=1e-4)
        L = s.noise_factor(0.5)
        torch.testing.assert_close(L @ L.T, 0.25 * s.w @ s.w.T, atol=1e-4, rtol=1e-4)
        # the scorer's embedding is the model's own vision input: the same log-probs from either
        pv, grid = vlm.preprocess(x)
        own = vlm.model.model.visual.patch_embed(pv)
    torch.testing.assert_close(s.embed(x), own, atol=1e-5, rtol=1e-5)


def test_noisy_logprobs_follow_the_pixel_noise_law(vlm):
    """Each option's log-probability under embedding-space noise and under pixel noise: two samples of one
    distribution (two-sample Kolmogorov-Smirnov, 600 draws each, every option), and the classic sampler's
    counts equal the argmax counts of the same draws."""
    it = item()
    x = torch.rand(3, 56, 56, generator=gen(5))
    s = OptionScorer(vlm, it)
    with torch.no_grad():
        fast = s.noisy_logprobs(x, 600, sigma=0.5, generator=gen(6))
        d = torch.randn(600, 3, 56, 56, generator=gen(7))
        slow = s.logprobs(x + 0.5 * d)
    assert fast.std(0).min() > 1e-3                          # the noise does move the scores
    for j in range(4):
        assert ks_2samp(fast[:, j].numpy(), slow[:, j].numpy()).pvalue > 0.001, j
    counts = s.counts(x, 250, sigma=0.5, batch_size=100, num_classes=5, generator=gen(8))
    again = torch.cat([s.noisy_logprobs(x, b, sigma=0.5, generator=g) for g in [gen(8)] for b in (100, 100, 50)])
    assert counts.tolist() == torch.bincount(again.argmax(-1), minlength=5).tolist()


def test_unsupported_models_fall_back_to_pixel_noise(tmp_path, vlm):
    class Other:
        model = torch.nn.Linear(2, 2)

    assert option_scorer.supported(vlm) and not option_scorer.supported(Other())
    with pytest.raises(ValueError, match="OptionScorer supports"):
        OptionScorer(Other(), item())
    with pytest.raises(ValueError, match="grid of patches per image"):
        OptionScorer(vlm, item()).logprobs(torch.rand(1, 3, 84, 84))


def test_certify_items_records_where_the_noise_was_drawn(tmp_path, vlm):
    from PIL import Image

    Image.fromarray(np.full((56, 56, 3), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    it = item()
    it = VQAItem(**{**it.__dict__, "image_path": tmp_path / "a.png"})
    kw = dict(sigma=0.25, n0=8, n=32, alpha=0.01, image_size=56, batch_size=16)
    fast = ce.certify_items(vlm, [it], records_path=tmp_path / "e.jsonl", **kw)
    slow = ce.certify_items(vlm, [it], noise="pixel", records_path=tmp_path / "p.jsonl", **kw)
    assert fast["noise_drawn"].tolist() == ["embedding"] and slow["noise_drawn"].tolist() == ["pixel"]
    assert fast["noise"].tolist() == ["embedding"]
    with pytest.raises(ValueError, match="noise='pixel' but this run has noise='embedding'"):
        ce.certify_items(vlm, [it], records_path=tmp_path / "p.jsonl", **kw)
    with pytest.raises(ValueError, match="noise must be one of"):
        ce.certify_items(vlm, [it], noise="latent", **kw)
