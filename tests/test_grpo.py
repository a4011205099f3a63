"""GRPO / AT-GRPO on TRL: dataset, rewards, schedule, logs, resume, the adversarial hook, caching.

The model is the tiny Qwen2-VL-architecture model at 56x56 on toy images; a module-level
fixture warms it up with a few SFT steps (sft.train_sft, no-think targets) so that GRPO's
rollouts sometimes match the format and the group advantages are not all zero.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from safemed_lib import data, grpo, models, prompts, sft, workbook
from trl import GRPOTrainer

SIZE = 56
EPS = 8 / 255
ROOT = Path(__file__).resolve().parents[1]


def _items(tmp: Path, n: int = 8, prefix: str = "q") -> list[data.VQAItem]:
    rng = np.random.default_rng(len(prefix))
    out = []
    for i in range(n):
        p = tmp / f"{prefix}im{i}.png"
        # the answer is visible: a bright image means A, a dark one B, mid grey C
        level = (200, 40, 120)[i % 3]
        arr = np.clip(level + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p)
        out.append(data.VQAItem(question_id=f"{prefix}{i}", dataset="toy", image_path=p,
                                question="How bright is the image?", options=["bright", "dark", "grey"],
                                answer="ABC"[i % 3], modality=data.MODALITIES[i % 2],
                                question_type="Modality Recognition"))
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(items, a warmed-up model saved on disk): load a fresh copy per test with _fresh()."""
    tmp = tmp_path_factory.mktemp("grpo")
    items = _items(tmp)
    torch.manual_seed(0)
    vlm = models.build_tiny_vlm([f"{it.question} {' '.join(it.options)}" for it in items] * 5,
                                image_size=SIZE, hidden_size=64)
    vlm = sft.train_sft(vlm, items, variant="nothink", steps=40, lr=1e-2, batch_size=8, image_size=SIZE,
                        out_dir=tmp / "sft", log_every=5)
    path = vlm.save(tmp / "warm")
    return items, path, _items(tmp, 4, prefix="test")


def _fresh(toy):
    return models.load_vlm(toy[1], image_size=SIZE)


def _weights(vlm) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in vlm.model.parameters()])


# --------------------------------------------------------------------------- data and rewards
def test_build_dataset_columns_prompt_and_exact_images(toy):
    items = toy[0]
    ds = grpo.build_dataset(items, "think", SIZE)
    assert set(ds.column_names) >= {"prompt", "image", "answer", "n_options", "question_id", "modality",
                                    "question_type"}
    row = ds[3]
    assert row["prompt"] == [{"role": "user", "content": prompts.build_prompt(items[3], "think")}]
    assert row["answer"] == items[3].answer and row["n_options"] == 3
    assert row["image"].size == (SIZE, SIZE)
    # PIL round trip is exact for 8-bit images: the trainer sees the pixels evaluate() sees
    assert torch.equal(grpo.from_pil(row["image"]), data.load_image(items[3].image_path, SIZE))
    with pytest.raises(ValueError, match="duplicate question_id"):
        grpo.build_dataset([items[0], items[0]], "think", SIZE)
    with pytest.raises(ValueError, match="mode"):
        grpo.build_dataset(items, "chatty", SIZE)


def test_reward_funcs_are_med_r1_format_plus_accuracy():
    fmt, acc = grpo.reward_funcs("think")
    good = [{"role": "assistant", "content": "<think> bright </think>\n<answer> A </answer>"}]
    wrong = [{"role": "assistant", "content": "<think> x </think><answer> B </answer>"}]
    bare = [{"role": "assistant", "content": "A"}]
    comps = [good, wrong, bare]
    assert fmt(comps) == [1.0, 1.0, 0.0]
    assert acc(comps, answer=["A", "A", "A"], n_options=[3, 3, 3]) == [1.0, 0.0, 0.0]
    assert grpo.reward_funcs("nothink")[0]([[{"content": "<answer> C </answer>"}]]) == [1.0]


# --------------------------------------------------------------------------- schedule and config
def test_adversarial_schedule_and_validation():
    cfg = grpo.AdversarialConfig(eps=8 / 255, alpha=2 / 255, clean_steps=2, ramp_steps=4)
    assert cfg.schedule(0) == (0.0, 2 / 255) and cfg.schedule(1)[0] == 0.0
    eps = [cfg.schedule(s)[0] for s in range(2, 8)]
    assert eps == pytest.approx([8 / 255 * k / 4 for k in (1, 2, 3, 4)] + [8 / 255] * 2)
    assert cfg.schedule(3)[1] == pytest.approx(1 / 255)  # alpha ramps with eps
    assert grpo.as_adversarial({"eps": 0.01, "fraction": 1.0}).fraction == 1.0
    for bad in ({"norm": "l1"}, {"fraction": 1.5}, {"steps": 0}, {"eps": -1.0}, {"target": "x"}):
        with pytest.raises(ValueError):
            grpo.AdversarialConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        grpo.as_adversarial({"epsilon": 0.1})


def test_grpo_config_is_cpu_safe_and_med_r1(tmp_path):
    cfg = grpo.grpo_config(tmp_path, steps=3, lr=1e-6, num_generations=4, batch_size=8, beta=0.04,
                           temperature=1.0, max_completion_length=32, seed=0, device="cpu", save_steps=1)
    assert cfg.use_cpu and not cfg.bf16 and not cfg.fp16 and not cfg.gradient_checkpointing
    assert (cfg.num_generations, cfg.beta, cfg.loss_type, cfg.scale_rewards, cfg.num_iterations) == \
        (4, 0.04, "grpo", "group", 1)


def test_log_columns_and_csv_merges_steps(tmp_path):
    assert grpo.log_column("rewards/think_format_reward/mean") == "reward_format"
    assert grpo.log_column("rewards/accuracy_reward/adversarial") == "reward_accuracy_adv"
    assert grpo.log_column("completions/mean_length") == "completion_length"
    hist = [{"step": 1, "reward": 0.5, "kl": 0.0}, {"step": 2, "reward": 1.0, "loss": 0.1},
            {"step": 2, "train_runtime": 3.0, "train_loss": 0.1}, {"step": 1, "reward": 0.5, "kl": 0.0}]
    df = pd.read_csv(grpo.write_log_csv(hist, tmp_path / "log.csv"))
    assert df["step"].tolist() == [1, 2] and df["reward"].tolist() == [0.5, 1.0]
    assert "train_runtime" not in df


# --------------------------------------------------------------------------- training
def test_train_grpo_learns_logs_and_resumes(toy, tmp_path):
    items = toy[0]
    vlm = _fresh(toy)
    w0 = _weights(vlm)
    kw = dict(mode="nothink", lr=3e-3, num_generations=4, batch_size=8, beta=0.04, temperature=1.5,
              max_completion_length=8, out_dir=tmp_path / "run", seed=0, save_steps=1)
    vlm = grpo.train_grpo(vlm, items, steps=2, **kw)
    log = grpo.read_log(tmp_path / "run")
    assert log["step"].tolist() == [1, 2]
    for col in ("reward", "reward_format", "reward_accuracy", "completion_length", "kl", "loss"):
        assert col in log and log[col].notna().all(), col
    assert log["reward"].max() > 0, "warm-up SFT should make some rollouts well-formed"
    assert not torch.equal(w0, _weights(vlm)), "GRPO did not change the weights"
    assert (tmp_path / "run" / "ref" / "config.json").is_file()  # the KL reference = starting weights
    w2 = _weights(vlm)
    # resume: a second call with more steps continues from checkpoint-2, no duplicated rows
    vlm3 = grpo.train_grpo(_fresh(toy), items, steps=3, **kw)
    log = grpo.read_log(tmp_path / "run")
    assert log["step"].tolist() == [1, 2, 3]
    assert vlm3.trainer.state.global_step == 3
    # ... and a finished run just reloads its final weights (no training step)
    again = grpo.train_grpo(_fresh(toy), items, steps=3, **kw)
    assert torch.equal(_weights(again), _weights(vlm3))
    assert not torch.equal(w2, _weights(vlm3))


def test_train_grpo_lora_merges_adapter(toy, tmp_path):
    vlm = _fresh(toy)
    vlm = grpo.train_grpo(vlm, toy[0], mode="nothink", steps=1, lr=1e-2, num_generations=4, batch_size=8,
                          beta=0.04, max_completion_length=6, out_dir=tmp_path / "lora", lora=True)
    assert not hasattr(vlm.model, "merge_and_unload")  # a plain model again, ready for evaluate/save
    assert isinstance(vlm.model, type(_fresh(toy).model))


def test_bad_arguments_fail_clearly(toy, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.train_grpo(_fresh(toy), toy[0], steps=1, batch_size=6, num_generations=4, out_dir=tmp_path)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.train_grpo(_fresh(toy), toy[0], steps=1, batch_size=4, num_generations=1, out_dir=tmp_path)


# --------------------------------------------------------------------------- AT-GRPO
class _Spy(grpo.ATGRPOTrainer):
    """Records the pixel values the policy-gradient loss sees."""

    seen: list = []

    def _compute_loss(self, model, inputs):
        _Spy.seen.append((inputs["pixel_values"].detach().clone(), inputs["image_grid_thw"].clone()))
        return super()._compute_loss(model, inputs)


def _at_trainer(vlm, items, out_dir, cls=grpo.ATGRPOTrainer, **adv):
    cfg = grpo.grpo_config(out_dir, steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0,
                           temperature=1.0, max_completion_length=6, seed=0, device="cpu", save_steps=10)
    return cls(model=vlm.model, reward_funcs=grpo.reward_funcs("nothink"), args=cfg,
               train_dataset=grpo.build_dataset(items, "nothink", SIZE), processing_class=vlm.processor,
               vlm=vlm, items=items, mode="nothink",
               adversarial=grpo.AdversarialConfig(**{"eps": EPS, "alpha": 2 / 255, "steps": 2, **adv}))


def test_at_grpo_hook_is_called_and_loss_sees_adversarial_pixels(toy, tmp_path):
    """Fails loudly if TRL stops calling the overridden private hooks, or if the images the
    policy-gradient loss sees are not the attacked ones."""
    items = toy[0]
    vlm = _fresh(toy)
    _Spy.seen = []
    trainer = _at_trainer(vlm, items, tmp_path, cls=_Spy, fraction=1.0)
    trainer.train()
    assert trainer.hook_calls == {"generate_and_score": 1, "calculate_rewards": 1}, trainer.hook_calls
    assert trainer.attacked_images == 2  # 8 completions = 2 questions x 4, all attacked
    (pv, grid), = _Spy.seen
    # every image in the loss batch differs from its clean version, by at most eps in pixel space
    clean_pv = {}
    for q, it in trainer.items.items():
        clean_pv[q] = vlm.preprocess(data.load_image(it.image_path, SIZE)[None])[0]
    rows = pv.split([int(g.prod()) for g in grid])
    std = torch.tensor(vlm.processor.image_processor.image_std).repeat_interleave(2 * 14 * 14)
    for r in rows:
        diffs = {q: ((r - c) * std).abs().max().item() for q, c in clean_pv.items() if c.shape == r.shape}
        q, d = min(diffs.items(), key=lambda kv: kv[1])
        assert 0 < d <= EPS + 1e-5, (q, d)
    m = trainer.state.log_history[0]
    assert m["adv/fraction"] == 1.0 and m["rewards/adversarial"] is not None
    assert m["adv/loss_adv"] > m["adv/loss_clean"]  # PGD raised the answer NLL


def test_at_grpo_fails_loudly_when_hook_is_bypassed(toy, tmp_path, monkeypatch):
    """Simulates a TRL release that no longer routes generation through the overridden method."""
    items = toy[0]
    orig = GRPOTrainer._prepare_inputs

    def renamed(self, generation_batch):  # what a refactor would look like from our side
        self._generate_and_score_completions = lambda b: GRPOTrainer._generate_and_score_completions(self, b)
        self._calculate_rewards = lambda *a: GRPOTrainer._calculate_rewards(self, *a)
        return orig(self, generation_batch)

    monkeypatch.setattr(GRPOTrainer, "_prepare_inputs", renamed)
    trainer = _at_trainer(_fresh(toy), items, tmp_path, fraction=1.0)
    with pytest.raises(RuntimeError, match="did not call the hooks"):
        trainer.train()


def test_perturb_same_image_per_question_deterministic_and_in_ball(toy, tmp_path):
    items = toy[0]
    vlm = _fresh(toy)
    trainer = _at_trainer(vlm, items, tmp_path, fraction=0.5)
    trainer.model.train()
    ds = grpo.build_dataset(items, "nothink", SIZE)
    rows = [ds[i] for i in range(len(items)) for _ in range(4)]  # groups of 4 copies
    out1 = trainer._perturb(copy.deepcopy(rows))
    flags1 = list(trainer._adv_flags)
    out2 = trainer._perturb(copy.deepcopy(rows))
    assert flags1 == trainer._adv_flags and 0 < sum(flags1) < len(rows)
    by_q: dict[str, list] = {}
    for r, o1, o2, f in zip(rows, out1, out2, flags1):
        a, b, clean = grpo.from_pil(o1["image"]), grpo.from_pil(o2["image"]), grpo.from_pil(r["image"])
        assert torch.equal(a, b)  # deterministic in (seed, step, question)
        by_q.setdefault(r["question_id"], []).append(a)
        delta = (a - clean).abs().max().item()
        assert (0 < delta <= EPS + 1e-6) if f else delta == 0
    for imgs in by_q.values():  # every copy of a question carries the same image
        assert all(torch.equal(imgs[0], im) for im in imgs)


# --------------------------------------------------------------------------- caching
def test_ensure_grpo_trains_once_then_loads(toy, tmp_path):
    calls = []

    def base():
        calls.append(1)
        return _fresh(toy)

    kw = dict(mode="nothink", steps=1, lr=1e-2, num_generations=4, batch_size=8, beta=0.0,
              max_completion_length=6, seed=0, base_id="warm")
    a = grpo.ensure_grpo(tmp_path, "g", base, toy[0], **kw)
    b = grpo.ensure_grpo(tmp_path, "g", base, toy[0], **kw)
    assert len(calls) == 1 and torch.equal(_weights(a), _weights(b))
    assert json.loads((tmp_path / "g" / "done.json").read_text())["settings"]["steps"] == 1
    grpo.ensure_grpo(tmp_path, "g", base, toy[0], **{**kw, "lr": 2e-2})  # other settings: retrain
    assert len(calls) == 2


def test_plot_curves(tmp_path):
    df = pd.DataFrame({"step": [1, 2, 3], "reward": [0.1, 0.5, 1.0], "reward_format": [0.1, 0.4, 0.9],
                       "reward_accuracy": [0.0, 0.1, 0.1], "completion_length": [9, 8, 7],
                       "reward_clean": [0.2, 0.6, 1.1], "reward_adv": [0.0, 0.3, 0.8],
                       "adv_success_rate": [0.5, 0.4, 0.2]})
    fig = grpo.plot_curves({"AT-GRPO": df}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and len(fig.axes) == 6


# --------------------------------------------------------------------------- distributed (slow)
@pytest.mark.slow
def test_accelerate_two_cpu_processes(tmp_path):
    """accelerate launch, 2 processes on the CPU (gloo), scripts/train_grpo.py, 2 AT-GRPO steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "29531",
           str(ROOT / "scripts/train_grpo.py"), "--config", str(ROOT / "configs/recipes/tiny_at_grpo.yaml"),
           "--output_dir", str(out), "--bench_dir", str(tmp_path / "bench"), "--n_images", "40",
           "--image_size", "56", "--steps", "2", "--batch_size", "4", "--max_completion_length", "6",
           "--adversarial.steps", "1", "--adversarial.ramp_steps", "0", "--save_steps", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170, cwd=ROOT)
    (tmp_path / "launch.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["num_processes"] == 2
    log = grpo.read_log(out)
    assert log["step"].tolist() == [1, 2] and log["adv_eps"].iloc[-1] == pytest.approx(8 / 255, rel=1e-3)
    assert (out / "model" / "config.json").is_file()


# --------------------------------------------------------------------------- experiment helpers
def _no_model():
    raise AssertionError("the cached results should have been read back without building a model")


def test_generalization_tests_pair_each_cell_with_the_base_and_sft():
    qids = [f"q{i}" for i in range(10)]
    def rows(method, group, correct):
        return pd.DataFrame({"method": method, "train_group": group, "question_id": qids, "correct": correct})
    res = pd.concat([rows("base", "(base)", [1] * 5 + [0] * 5),
                     rows("SFT", "CT", [1] * 5 + [0] * 5), rows("GRPO", "CT", [1] * 10),
                     rows("SFT", "MRI", [0] * 10), rows("GRPO", "MRI", [1] * 5 + [0] * 5)])
    t = grpo.generalization_tests(res).set_index(["train_group", "comparison"])
    assert list(t.index.get_level_values(0).unique()) == ["CT", "MRI"] and len(t) == 6
    assert t.loc[("CT", "SFT - base"), "diff (points)"] == 0 and t.loc[("CT", "SFT - base"), "p_value"] == 1.0
    assert t.loc[("CT", "GRPO - base"), "diff (points)"] == pytest.approx(50.0)
    assert t.loc[("CT", "GRPO - base"), "p_value"] == pytest.approx(2 * 0.5 ** 5)   # 5 fixes, 0 flips
    assert t.loc[("MRI", "SFT - base"), "diff (points)"] == pytest.approx(-50.0)
    assert t.loc[("MRI", "GRPO - SFT"), "diff (points)"] == pytest.approx(50.0) and (t["n"] == 10).all()


def _matrices(base: float, sft: float, grpo_: float, groups=("CT", "MRI")) -> dict:
    def m(v, index):
        df = pd.DataFrame(v, index=pd.Index(index, name="train_group"), columns=list(groups))
        return df.assign(All=df.mean(axis=1))
    return {"base": m(base, ["(base)"]), "SFT": m(sft, list(groups)), "GRPO": m(grpo_, list(groups))}


def test_generalization_claims_material_gain_and_chance():
    claims = grpo.generalization_claims({"modality": _matrices(40.0, 45.0, 52.0)}, chance=29.0, detail="640 Qs")
    (c,) = claims
    assert c["claim_id"] == "medr1.cross_modality_gain" and c["holds"] is True
    assert c["ours"] == "GRPO - base +12.00 points (SFT - base +5.00; GRPO mean accuracy 52.0%)"
    assert c["detail"].startswith("640 Qs; holds = GRPO at least 10 points above the base")
    small = grpo.generalization_claims({"question_type": _matrices(40.0, 45.0, 45.0)}, chance=29.0)
    assert [c["claim_id"] for c in small] == ["medr1.cross_qtype_gain"] and small[0]["holds"] is False
    assert grpo.generalization_claims({"modality": _matrices(20.0, 30.0, 30.0)}, chance=29.0, min_gain=5)[0]["holds"] \
        is None                                                 # GRPO at 30% with chance 29%: cannot tell
    assert grpo.generalization_claims({"modality": _matrices(40.0, 45.0, 45.0)}, chance=29.0,
                                      min_gain=5)[0]["holds"] is True


def test_generalization_runs_in_a_worker_process_are_read_back(toy, tmp_path):
    """Notebook 04 trains its second protocol in a worker process (workbook.background) and reads
    its cached runs back here: the base ensure_warmup returns must pickle, and the read-back
    must build no model."""
    items, path, test = toy
    base, base_id = grpo.ensure_warmup(tmp_path, items, mode="nothink", n_items=4, steps=0, lr=0.0, batch_size=4,
                                       image_size=SIZE, model_path=path)
    assert torch.equal(_weights(pickle.loads(pickle.dumps(base))()), _weights(_fresh(toy)))
    kw = dict(by="question_type", base_id=base_id, mode="nothink", image_size=SIZE,
              sft_kwargs=dict(steps=1, lr=1e-3, batch_size=4),
              grpo_kwargs=dict(steps=1, lr=1e-3, batch_size=4, num_generations=4, beta=0.0,
                               max_completion_length=6), eval_batch_size=8, max_new_tokens=8, progress=None)
    workbook.background(grpo.generalization_runs, tmp_path, items, test, base=base, **kw).result()
    res, _ = grpo.generalization_runs(tmp_path, items, test, base=_no_model, **kw)
    groups = {it.question_type for it in items}
    assert set(res["train_group"]) == groups | {"(base)"} and len(res) == len(test) * (1 + 2 * len(groups))


def test_generalization_runs_matrices_gains_and_cache(toy, tmp_path):
    items, _, test = toy
    kw = dict(by="modality", base_id="warm", mode="nothink", image_size=SIZE,
              sft_kwargs=dict(steps=1, lr=1e-3, batch_size=4),
              grpo_kwargs=dict(steps=1, lr=1e-3, batch_size=4, num_generations=4, beta=0.0,
                               max_completion_length=6), eval_batch_size=8, max_new_tokens=8, progress=None)
    res, times = grpo.generalization_runs(tmp_path, items, test, base=lambda: _fresh(toy), **kw)
    groups = [g for g in data.MODALITIES if any(it.modality == g for it in items)]
    assert set(times["train_group"]) == set(groups) and len(res) == len(test) * (1 + 2 * len(groups))
    again, _ = grpo.generalization_runs(tmp_path, items, test, base=_no_model, **kw)  # all cached
    pd.testing.assert_frame_equal(res.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)
    mats = grpo.generalization_matrix(res, "modality")
    assert list(mats) == ["base", "SFT", "GRPO"] and list(mats["GRPO"].index) == groups
    cell = res.query("method == 'GRPO' and train_group == @groups[0] and modality == @groups[1]")
    assert mats["GRPO"].loc[groups[0], groups[1]] == pytest.approx(100 * cell["correct"].mean())
    gains = grpo.generalization_gains(mats)
    expected = (mats["GRPO"].drop(columns="All") - mats["base"].drop(columns="All").iloc[0]).stack().mean()
    assert gains.loc["GRPO - base", "mean gain (points)"] == pytest.approx(expected)


def test_generalization_gains_by_hand():
    cols = ["CT", "MRI"]
    m = lambda rows: pd.DataFrame(rows, index=cols, columns=cols).assign(All=0.0)  # noqa: E731
    mats = {"base": pd.DataFrame([[20.0, 40.0, 0.0]], index=["(base)"], columns=cols + ["All"]),
            "SFT": m([[30.0, 40.0], [20.0, 50.0]]), "GRPO": m([[50.0, 60.0], [40.0, 70.0]])}
    g = grpo.generalization_gains(mats)
    assert g.loc["GRPO - base", "mean gain (points)"] == pytest.approx((30 + 20 + 20 + 30) / 4)
    assert g.loc["GRPO - base", "diagonal (in-group) gain"] == pytest.approx((30 + 30) / 2)
    assert g.loc["GRPO - base", "off-diagonal gain"] == pytest.approx((20 + 20) / 2)
    assert g.loc["GRPO - SFT", "mean gain (points)"] == pytest.approx(20.0)


def test_robustness_summary_targets():
    t = pd.DataFrame({"clean": [30.0, 25.0], "PGD": [5.0, 12.0]}, index=["SFT", "AT"])
    row = grpo.robustness_summary(t, baseline="SFT", robust="AT").iloc[0]
    assert row["PGD ratio"] == pytest.approx(2.4) and row["PGD ratio >= 2"] and row["clean drop <= 10"]
    t.loc["AT", "clean"] = 10.0
    assert not grpo.robustness_summary(t, baseline="SFT", robust="AT").iloc[0]["clean drop <= 10"]


def test_robustness_claims_verdicts():
    t = pd.DataFrame({"clean": [70.0, 65.0, 60.0, 58.0], "PGD": [30.0, 45.0, 20.0, 25.0]},
                     index=["SFT-think", "AT-GRPO-think", "SFT-nothink", "AT-GRPO-nothink"])
    c = {x["claim_id"]: x for x in grpo.robustness_claims(t, ["think", "nothink"], 28.0, detail="160 Qs")}
    assert c["safemed.atgrpo_robust"]["holds"] is False  # +15 for think, +5 for nothink: not both >= 10
    assert c["safemed.atgrpo_robust"]["ours"] == ("AT-GRPO-think 65.0% clean / 45.0% PGD vs SFT-think 70.0% / 30.0%; "
                                                  "AT-GRPO-nothink 58.0% clean / 25.0% PGD vs SFT-nothink 60.0% / 20.0%")
    assert c["safemed.atgrpo_robust"]["detail"].startswith("160 Qs; holds =")
    assert c["safemed.cot_more_robust"]["holds"] is True  # 30 > 20 and 45 > 25
    assert c["safemed.cot_more_robust"]["ours"] == ("SFT: think 30.0% vs nothink 20.0% under PGD; "
                                                    "AT-GRPO: think 45.0% vs nothink 25.0% under PGD")
    assert grpo.robustness_claims(t, ["think"], 28.0)[0]["holds"] is True  # think alone: +15
    t.loc["SFT-nothink", "clean"] = 30.0  # within 10 points of chance: does not read the image
    c = {x["claim_id"]: x for x in grpo.robustness_claims(t, ["think", "nothink"], 28.0)}
    assert c["safemed.atgrpo_robust"]["holds"] is None and c["safemed.cot_more_robust"]["holds"] is None
    c = {x["claim_id"]: x for x in grpo.robustness_claims(t.drop(index=["SFT-nothink", "AT-GRPO-nothink"]),
                                                            ["think"], 28.0)}
    assert c["safemed.cot_more_robust"] == dict(claim_id="safemed.cot_more_robust", holds=None,
                                                ours="no think/nothink pair on this profile",
                                                detail="PGD accuracy, same attack; chance 28.0%")


def test_robustness_eval_attacks_and_caches(toy, tmp_path):
    items, _, test = toy
    grpo.ensure_grpo(tmp_path, "g", lambda: _fresh(toy), items, base_id="warm", mode="nothink", steps=1,
                     lr=1e-3, num_generations=4, batch_size=4, beta=0.0, max_completion_length=6)
    kw = dict(run_dir=tmp_path / "g", mode="nothink", image_size=SIZE, eps=8 / 255, alpha=2 / 255, steps=2,
              batch_size=4, max_new_tokens=8)
    clean, pgd = grpo.robustness_eval(lambda: models.load_vlm(tmp_path / "g" / "model"), test, **kw)
    assert len(clean) == len(pgd) == len(test) and pgd["perturbed"].all() and not clean["perturbed"].any()
    assert (pgd["attack_linf"] <= 8 / 255 + 1e-6).all() and pgd["rounded_8bit"].all()
    assert (pgd["attack_loss_adv"] >= pgd["attack_loss_clean"] - 1e-4).all()
    clean2, pgd2 = grpo.robustness_eval(_no_model, test, **kw)  # read back from the records
    assert clean2["correct"].tolist() == clean["correct"].tolist() and pgd2["pred"].tolist() == pgd["pred"].tolist()
