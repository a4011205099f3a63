"""Tests for the attack objectives beyond the answer NLL (attacks: first token, option margin), the
per-entry attack grid, and the evaluation helpers benchmark.strongest / masking_checks (issue #33)."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch

from safemed_lib import attacks, benchmark, prompts
from unit_vqa import assert_gradient_is_the_derivative, tiny_vlm, vqa_items


@pytest.fixture(scope="module")
def vlm():
    v = tiny_vlm()
    v.model.eval()
    return v


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return vqa_items(tmp_path_factory.mktemp("imgs"))


# ----------------------------------------------------------------------------- first token
def test_next_token_logprobs_is_the_first_token_nll(vlm, vqa):
    items, images = vqa
    first = vlm.tokenizer("<answer>", add_special_tokens=False)["input_ids"][0]
    text = vlm.tokenizer.decode([first])
    assert vlm.tokenizer(text, add_special_tokens=False)["input_ids"] == [first]  # a round-tripping token
    with torch.no_grad():
        lp = vlm.next_token_logprobs(images, items, "nothink")
        nll = vlm.sequence_nll(images, items, [text] * 3, prompt="nothink", reduction="sum", add_eos=False)
    assert lp.shape[0] == 3 and torch.allclose(lp.exp().sum(-1), torch.ones(3), atol=1e-4)
    torch.testing.assert_close(-lp[:, first], nll, rtol=1e-4, atol=1e-4)


def test_first_token_target_is_the_clean_greedy_token(vlm, vqa):
    items, images = vqa
    ids = attacks.first_tokens(vlm, images, items, prompt="nothink")
    with torch.no_grad():
        lp = vlm.next_token_logprobs(images, items, "nothink")
    assert ids == lp.argmax(-1).tolist()  # greedy decoding's first step = the argmax (no logit processors)
    loss_fn, kinds = attacks.attack_loss(vlm, items, prompt="nothink", target="first_token", clean_images=images)
    assert kinds == ["first_token"] * 3
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(images), -lp.max(-1).values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="clean_images"):
        attacks.attack_loss(vlm, items, prompt="nothink", target="first_token")
    with pytest.raises(ValueError, match="attack_loss"):
        attacks.answer_targets(vlm, items, prompt="nothink", target="first_token")


def test_first_token_loss_is_differentiable_on_raw_pixels(vlm, vqa):
    items, images = vqa
    loss_fn, _ = attacks.attack_loss(vlm, items, prompt="think", target="first_token", clean_images=images)
    x = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    assert g.shape == images.shape and (g != 0).float().mean() > 0.9
    assert_gradient_is_the_derivative(loss_fn, images, h=0.02, rtol=0.02)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_first_token_stays_in_the_ball_and_raises_the_loss(vlm, vqa, norm, eps):
    items, images = vqa
    hook = attacks.pgd_perturb(vlm, prompt="nothink", eps=eps, steps=3, norm=norm, target="first_token",
                               random_start=False)
    x_adv, extras = hook(images, items)
    d = (x_adv - images).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and (size > 0).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert [e["attack_target"] for e in extras] == ["first_token"] * 3
    assert all(e["attack_loss_adv"] > e["attack_loss_clean"] for e in extras)


# ----------------------------------------------------------------------------- margin
def test_option_margin_by_hand():
    s = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5, -0.5, -4.0, -9.0])]
    m = attacks.option_margin(s, [0, 2, 1])
    torch.testing.assert_close(m, torch.tensor([-1.0, 2.0, 0.0]))  # right, wrong by 2, a tie
    with pytest.raises(ValueError, match="answers"):
        attacks.option_margin(s[:1], [3])


def test_margin_loss_sign_is_the_wrong_argmax(vlm, vqa):
    items, images = vqa
    loss_fn = attacks.margin_loss(vlm, items, prompt="nothink")
    x = images.clone().requires_grad_(True)
    m = loss_fn(x)
    (g,) = torch.autograd.grad(m.sum(), x)
    assert (g != 0).float().mean() > 0.9  # differentiable w.r.t. the pixels
    with torch.no_grad():
        lps = vlm.option_logprobs(images, items, prompt="nothink")
    for mi, lp, it in zip(m.detach(), lps, items):
        y = prompts.LETTERS.index(it.answer)
        want = max(float(v) for j, v in enumerate(lp) if j != y) - float(lp[y])
        assert float(mi) == pytest.approx(want, abs=1e-5)
        assert (float(mi) > 0) == (int(lp.argmax()) != y)
    hook = attacks.pgd_perturb(vlm, prompt="nothink", eps=8 / 255, steps=3, target="margin", random_start=False)
    _, extras = hook(images, items)
    assert [e["attack_target"] for e in extras] == ["margin"] * 3
    assert all(e["attack_loss_adv"] > e["attack_loss_clean"] for e in extras)


def test_margin_refuses_think_prompts(vlm, vqa, tmp_path):
    items, _ = vqa
    with pytest.raises(ValueError, match="margin.*answer-first.*'think'"):
        attacks.pgd_perturb(vlm, prompt="think", eps=8 / 255, target="margin")
    with pytest.raises(ValueError, match="answer-first"):
        attacks.margin_loss(vlm, items, prompt="think")
    grid = benchmark.attack_grid((4,), (), 1, target="margin")
    with pytest.raises(ValueError, match="answer-first"):
        benchmark.evaluate_attacks(vlm, items, prompt="think", image_size=56, grid=grid, records_dir=tmp_path, tag="m")
    assert list(tmp_path.iterdir()) == []  # refused before the clean run


# ----------------------------------------------------------------------------- grid with per-entry settings
def _old_digest(g, prompt, image_size=56, method="generate", max_new_tokens=4):
    """The record-file digest of an entry as evaluate_attacks computed it before per-entry settings."""
    settings = dict(g, seed=0, restarts=1, target="auto", rounding=True)
    key = json.dumps([prompt, image_size, method, max_new_tokens, settings], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def test_attack_grid_per_entry_settings():
    assert all(set(g) == {"name", "norm", "eps", "alpha", "steps"} for g in benchmark.attack_grid())
    g = benchmark.attack_grid((8,), (0.5,), 50, restarts=5, target="margin", random_start=False, suffix="_x")
    assert [e["name"] for e in g] == ["linf_8_x", "l2_0.5_x"]
    assert all(e["restarts"] == 5 and e["target"] == "margin" and e["random_start"] is False for e in g)
    with pytest.raises(ValueError, match="target"):
        benchmark.attack_grid(target="logits")
    fork = benchmark.fork_attack()
    assert (fork["eps"], fork["alpha"], fork["steps"], fork["target"], fork["random_start"]) == \
        (0.03, 0.01, 10, "first_token", False)


def test_evaluate_attacks_mixed_grid(vlm, vqa, tmp_path):
    items, _ = vqa
    grid = (benchmark.attack_grid((4,), (), 1) + benchmark.attack_grid((4,), (), 2, restarts=2, suffix="_x2")
            + benchmark.attack_grid((4,), (), 1, target="margin", suffix="_margin")
            + benchmark.attack_grid((4,), (), 1, target="first_token", random_start=False, suffix="_ft"))
    df = benchmark.evaluate_attacks(vlm, items, prompt="nothink", image_size=56, grid=grid, records_dir=tmp_path,
                                    tag="m", max_new_tokens=4, batch_size=3)
    per = df[df.attack != "clean"].groupby("attack")
    assert per["attack_restarts"].first().to_dict() == {"linf_4": 1, "linf_4_x2": 2, "linf_4_margin": 1, "linf_4_ft": 1}
    assert per["attack_target"].first().to_dict() == {"linf_4": "answer", "linf_4_x2": "answer",
                                                      "linf_4_margin": "margin", "linf_4_ft": "first_token"}
    assert per["attack_random_start"].first().to_dict()["linf_4_ft"] == False  # noqa: E712
    assert (df.loc[df.attack != "clean", "attack_linf"] <= 4 / 255 + 1e-6).all()
    # an entry without its own settings keeps the record name it had before
    assert (tmp_path / f"m_linf_4_{_old_digest(grid[0], 'nothink')}.jsonl").exists()
    assert len(list(tmp_path.glob("*.jsonl"))) == 5


# ----------------------------------------------------------------------------- strongest
def _long(rows: dict[str, list[int]], eps: dict[str, float] | None = None, model: str = "m") -> pd.DataFrame:
    out = []
    for attack, correct in rows.items():
        e = 0.0 if attack == "clean" else (eps or {}).get(attack, 8 / 255)
        out += [{"model": model, "attack": attack, "norm": "none" if attack == "clean" else "linf", "eps": e,
                 "question_id": f"q{i}", "correct": bool(c)} for i, c in enumerate(correct)]
    return pd.DataFrame(out)


def test_strongest_is_the_per_question_minimum():
    df = _long({"clean": [1, 1, 1, 0], "pgd10": [1, 0, 1, 1], "margin": [1, 1, 0, 1]})
    t = benchmark.strongest(df).set_index("attack")["accuracy"]
    assert t.to_dict() == {"clean": 75.0, "pgd10": 75.0, "margin": 75.0, "worst case": 25.0}
    t = benchmark.strongest(df, include_clean=False).set_index("attack")["accuracy"]
    assert t["worst case"] == 50.0  # q0 and q3 survive both attacks
    assert benchmark.strongest(df, ["pgd10"]).set_index("attack")["accuracy"]["worst case"] == 50.0
    two = pd.concat([df, _long({"clean": [1, 1, 1, 1], "pgd10": [0, 0, 0, 0], "margin": [1, 1, 1, 1]}, model="k")])
    t = benchmark.strongest(two)
    assert t[t.attack == "worst case"].set_index("model")["accuracy"].to_dict() == {"m": 25.0, "k": 0.0}


def test_strongest_refuses_mixed_questions_and_radii():
    df = _long({"clean": [1, 1, 1], "pgd10": [1, 0, 1]})
    with pytest.raises(ValueError, match="same questions"):
        benchmark.strongest(pd.concat([df, _long({"margin": [1, 1]})]))
    with pytest.raises(ValueError, match="radii"):
        benchmark.strongest(pd.concat([df, _long({"pgd4": [1, 1, 1]}, eps={"pgd4": 4 / 255})]))
    with pytest.raises(ValueError, match="no rows"):
        benchmark.strongest(df, ["pgd50"])


# ----------------------------------------------------------------------------- masking checks
def _sweep(right_per_eps: dict[float, int], n: int = 10, extra: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """A long table: clean and L-inf radii (in 1/255), the first k of n questions right at each."""
    rows = {}
    eps = {}
    for e, k in right_per_eps.items():
        name = "clean" if e == 0 else f"linf_{e:g}"
        rows[name] = [1] * k + [0] * (n - k)
        if e:
            eps[name] = e / 255
    for name, correct in (extra or {}).items():
        rows[name], eps[name] = correct, 8 / 255
    return _long(rows, eps)


def test_masking_checks_pass_a_monotone_sweep():
    df = _sweep({0: 9, 2: 7, 8: 4, 64: 3}, extra={"pgd50x5": [1] * 3 + [0] * 7})
    sweep = [f"linf_{e}" for e in (2, 8, 64)]
    t = benchmark.masking_checks(df, chance=0.3, pairs=[("linf_8", "pgd50x5")], sweep_attacks=sweep)
    assert list(t["check"]) == ["monotone"] * 3 + ["chance", "stronger"]
    assert t["passed"].tolist() == [True] * 5
    assert t.loc[t.check == "chance", "value"].item() == pytest.approx(0.3)


def test_masking_checks_flag_masking():
    df = _sweep({0: 9, 2: 5, 8: 7, 64: 6}, extra={"pgd50x5": [0] * 3 + [1] * 7})
    sweep = [f"linf_{e}" for e in (2, 8, 64)]
    t = benchmark.masking_checks(df, chance=0.3, pairs=[("linf_8", "pgd50x5")], sweep_attacks=sweep)
    mono = t[t.check == "monotone"]
    assert mono["passed"].tolist() == [True, False, False] and mono["value"].tolist() == [-4, 2, 1]
    assert t.loc[t.check == "chance", "passed"].item() is False  # 60% at 64/255, chance 30%
    assert t.loc[t.check == "stronger", "value"].item() == 3  # right under the stronger attack only: q7..q9
    # a tolerance in questions absorbs small rises
    t = benchmark.masking_checks(df, chance=0.3, tol=2, pairs=[("linf_8", "pgd50x5")], sweep_attacks=sweep)
    assert t[t.check == "monotone"]["passed"].all() and not t.loc[t.check == "stronger", "passed"].item()
    # no large radius: the chance check is not run; two attacks at one radius need sweep_attacks
    t = benchmark.masking_checks(_sweep({0: 9, 2: 5}), chance=0.3)
    assert t.loc[t.check == "chance", "passed"].item() is None
    with pytest.raises(ValueError, match="sweep_attacks"):
        benchmark.masking_checks(df, chance=0.3)
    with pytest.raises(ValueError, match="chance"):
        benchmark.masking_checks(df, chance=30, sweep_attacks=sweep)
