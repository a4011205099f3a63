"""GRPO on TRL (grpo.py): dataset, rewards, config, logs, resume, LoRA, the zoo's GRPO models, the recipe script.

The model is the tiny Qwen2-VL-architecture model at 56x56 on toy images; a module-level
fixture warms it up with a few SFT steps (sft.train_sft, no-think targets) so that GRPO's
rollouts sometimes match the format and the group advantages are not all zero. AT-GRPO's
trainer is tested in test_at_grpo.py, the notebooks' experiment helpers in test_experiments.py.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from safemed_lib import at_grpo, config, data, dataset, grpo, grpo_dist, models, prompts, runs, zoo
from safemed_lib.config import GRPORecipe
from toy import SIZE, toy_items, warm_toy_model
from twoproc import launch_env, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(items, a warmed-up model saved on disk): load a fresh copy per test with _fresh()."""
    return warm_toy_model(tmp_path_factory.mktemp("grpo"))


def _fresh(toy):
    return models.load_vlm(toy[1], image_size=SIZE)


def _weights(vlm) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in vlm.model.parameters()])


# --------------------------------------------------------------------------- data and rewards
def test_build_dataset_columns_prompt_and_exact_images(toy):
    items = toy[0]
    ds = grpo.build_dataset(items, "think", SIZE)
    # the table holds paths (of resized cache entries); the image is decoded when a row is read
    assert set(ds.column_names) >= {"prompt", "image_path", "answer", "n_options", "question_id", "modality",
                                    "question_type"}
    row = ds[3]
    assert set(row) >= {"prompt", "image", "answer", "n_options", "question_id", "modality", "question_type"}
    assert row["prompt"] == [{"role": "user", "content": prompts.build_prompt(items[3], "think")}]
    assert row["answer"] == items[3].answer and row["n_options"] == 3
    assert row["image"].size == (SIZE, SIZE)
    # PIL round trip is exact for 8-bit images: the trainer sees the pixels evaluate() sees
    assert torch.equal(data.from_pil(row["image"]), data.load_image(items[3].image_path, SIZE))
    assert ds["answer"] == [it.answer for it in items]  # column reads need no image
    with pytest.raises(ValueError, match="duplicate question_id"):
        grpo.build_dataset([items[0], items[0]], "think", SIZE)
    with pytest.raises(ValueError, match="mode"):
        grpo.build_dataset(items, "chatty", SIZE)


def _large_items(tmp: Path, n: int = 5) -> list[data.VQAItem]:
    """Items on larger, off-size originals (several modes); the last two questions share one image."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (203 + 7 * i, 301, 3), dtype=np.uint8) for i in range(n - 2)]
    ims = [Image.fromarray(a) for a in arrays] + [Image.fromarray((arrays[0][..., 0].astype(np.uint16) * 257))]
    out = []
    for i in range(n):
        p = tmp / f"big{min(i, n - 2)}.png"
        if not p.exists():
            ims[min(i, n - 2)].save(p)
        out.append(data.VQAItem(question_id=f"b{i}", dataset="toy", image_path=p, question="Which?",
                                options=["x", "y"], answer="AB"[i % 2], modality="CT",
                                question_type="Modality Recognition"))
    return out


def _eager_images(items, size):
    """The images of the dataset before the cache: one decode and resize per image, held as PIL."""
    return [data.to_pil(data.load_image(it.image_path, size)) for it in items]


def test_build_dataset_lazy_images_match_eager_and_hit_the_cache(tmp_path, monkeypatch):
    items = _large_items(tmp_path)
    eager = _eager_images(items, SIZE)
    decoded = []
    real = data.images._open_image
    monkeypatch.setattr(data.images, "_open_image", lambda p: decoded.append(Path(p)) or real(p))
    originals = {it.image_path for it in items}
    for build in range(2):
        decoded.clear()
        ds = grpo.build_dataset(items, "nothink", SIZE, cache_dir=tmp_path / "cache")
        # first build: each distinct original decoded once (the shared one too); second build: none
        assert [p for p in decoded if p in originals] == ([it.image_path for it in items[:-1]] if build == 0 else [])
        assert ds.features["image_path"].dtype == "string"  # no images in the table
        for i, im in enumerate(eager):
            got = ds[i]["image"]
            assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(im)), (build, i)
        rows = ds.__getitems__([4, 0])  # the DataLoader's batched read
        assert np.array_equal(np.asarray(rows[0]["image"]), np.asarray(eager[4]))
    assert [p for p in decoded if p in originals] == []  # reading rows decodes cache entries only


def test_build_dataset_changed_or_bad_original(tmp_path):
    items = _large_items(tmp_path, n=3)
    grpo.build_dataset(items, "think", SIZE, cache_dir=tmp_path / "cache")
    # a changed original is re-read, never served from its stale entry
    p = items[0].image_path
    st = p.stat()
    Image.fromarray(np.full((203, 301, 3), 7, np.uint8)).save(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds = grpo.build_dataset(items, "think", SIZE, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.asarray(ds[0]["image"]), np.asarray(_eager_images(items[:1], SIZE)[0]))
    assert np.asarray(ds[0]["image"]).max() == 7
    # an unreadable original fails at start-up, naming the file
    p.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=rf"{p.name} cannot be read by PIL"):
        grpo.build_dataset(items, "think", SIZE, cache_dir=tmp_path / "cache")


def test_reward_funcs_are_med_r1_format_plus_accuracy():
    fmt, acc = grpo.reward_funcs("think")
    good = [{"role": "assistant", "content": "<think> bright </think>\n<answer> A </answer>"}]
    wrong = [{"role": "assistant", "content": "<think> x </think><answer> B </answer>"}]
    bare = [{"role": "assistant", "content": "A"}]
    comps = [good, wrong, bare]
    assert fmt(comps) == [1.0, 1.0, 0.0]
    assert acc(comps, answer=["A", "A", "A"], n_options=[3, 3, 3]) == [1.0, 0.0, 0.0]
    assert grpo.reward_funcs("nothink")[0]([[{"content": "<answer> C </answer>"}]]) == [1.0]


# --------------------------------------------------------------------------- config and logs
def test_grpo_config_is_cpu_safe_and_med_r1(tmp_path):
    recipe = GRPORecipe(steps=3, lr=1e-6, num_generations=4, batch_size=8, beta=0.04, temperature=1.0,
                        max_completion_length=32)
    cfg = grpo.grpo_config(tmp_path, recipe, seed=0, device="cpu", save_steps=1)
    assert cfg.use_cpu and not cfg.bf16 and not cfg.fp16 and not cfg.gradient_checkpointing
    assert (cfg.num_generations, cfg.beta, cfg.loss_type, cfg.scale_rewards, cfg.num_iterations) == \
        (4, 0.04, "grpo", "group", 1)
    # every field of the recipe reaches TRL's config
    assert (cfg.max_steps, cfg.learning_rate, cfg.per_device_train_batch_size, cfg.temperature,
            cfg.max_completion_length) == (3, 1e-6, 8, 1.0, 32)


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
    recipe = GRPORecipe(steps=2, lr=3e-3, num_generations=4, batch_size=8, beta=0.04, temperature=1.5,
                        max_completion_length=8)
    kw = dict(mode="nothink", out_dir=tmp_path / "run", seed=0, save_steps=1)
    vlm = grpo.train_grpo(vlm, items, recipe, **kw)
    log = grpo.read_log(tmp_path / "run")
    assert log["step"].tolist() == [1, 2]
    for col in ("reward", "reward_format", "reward_accuracy", "completion_length", "kl", "loss"):
        assert col in log and log[col].notna().all(), col
    assert log["reward"].max() > 0, "warm-up SFT should make some rollouts well-formed"
    assert not torch.equal(w0, _weights(vlm)), "GRPO did not change the weights"
    assert (tmp_path / "run" / "ref" / "config.json").is_file()  # the KL reference = starting weights
    w2 = _weights(vlm)
    # resume: a second call with more steps continues from checkpoint-2, no duplicated rows
    longer = recipe.model_copy(update={"steps": 3})
    vlm3 = grpo.train_grpo(_fresh(toy), items, longer, **kw)
    log = grpo.read_log(tmp_path / "run")
    assert log["step"].tolist() == [1, 2, 3]
    assert vlm3.train_info["global_step"] == 3
    # ... and a finished run just reloads its final weights (no training step)
    again = grpo.train_grpo(_fresh(toy), items, longer, **kw)
    assert torch.equal(_weights(again), _weights(vlm3))
    assert not torch.equal(w2, _weights(vlm3))


def test_train_grpo_lora_merges_adapter(toy, tmp_path):
    vlm = _fresh(toy)
    recipe = GRPORecipe(steps=1, lr=1e-2, num_generations=4, batch_size=8, beta=0.04, max_completion_length=6)
    vlm = grpo.train_grpo(vlm, toy[0], recipe, mode="nothink", out_dir=tmp_path / "lora", lora=True)
    assert not hasattr(vlm.model, "merge_and_unload")  # a plain model again, ready for evaluate/save
    assert isinstance(vlm.model, type(_fresh(toy).model))


def test_train_grpo_frees_its_trainer(toy, tmp_path, monkeypatch):
    """Notebooks train many models in one kernel: no trainer (accelerator, optimizer) outlives train_grpo."""
    refs = []

    class Spy(grpo.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.append(weakref.ref(self))

    monkeypatch.setattr(grpo, "GRPOTrainer", Spy)
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.0, max_completion_length=4)
    vlm = grpo.train_grpo(_fresh(toy), toy[0], recipe, mode="nothink", out_dir=tmp_path / "run")
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None, "the trainer is still referenced after train_grpo"
    assert vlm.train_info == {"trainer": "Spy", "global_step": 1, "num_processes": 1}
    assert not hasattr(vlm, "trainer")


def test_ref_is_written_atomically_and_kept(toy, tmp_path, monkeypatch):
    """A crash while saving the KL reference leaves neither ref/ nor a temporary folder; a half
    ref/ of an older version is not taken as complete; a complete one is never rewritten."""
    vlm = _fresh(toy)
    out = tmp_path / "run"
    cls = type(vlm.model)
    real_save = cls.save_pretrained

    def crash(self, path, **kw):
        real_save(self, path, **kw)  # config.json and the weights are there ...
        raise OSError("disk full")   # ... but not the processor nor the settings

    monkeypatch.setattr(cls, "save_pretrained", crash)
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=4, batch_size=8, beta=0.04, max_completion_length=4)
    with pytest.raises(OSError, match="disk full"):
        grpo.train_grpo(vlm, toy[0], recipe, mode="nothink", out_dir=out)
    assert not (out / "ref" / "config.json").exists() and not any(p.name.startswith("ref") for p in out.iterdir())
    monkeypatch.setattr(cls, "save_pretrained", real_save)
    (out / "ref").mkdir()
    (out / "ref" / "config.json").write_text("{}")  # what the old non-atomic write left after a crash
    ref = grpo_dist.write_ref(vlm, out)
    assert grpo_dist.ref_complete(ref) and models.load_vlm(ref).image_size == SIZE
    monkeypatch.setattr(vlm, "save", lambda path: pytest.fail("a complete ref/ was rewritten"))
    assert grpo_dist.write_ref(vlm, out) == ref


def test_ref_under_zero3_is_saved_inside_the_gather(toy, tmp_path, monkeypatch):
    """Under ZeRO-3 (zero.Init) the starting weights are partitioned: ref/ is written inside
    deepspeed.zero.GatheredParameters over all the model's parameters (faked here: no deepspeed)."""
    events = []

    @contextlib.contextmanager
    def gathered(params):
        events.append(("gather", len(params)))
        yield
        events.append(("release",))

    monkeypatch.setattr(grpo_dist, "gathered", gathered)
    monkeypatch.setattr(grpo_dist, "zero3_enabled", lambda: True)
    vlm = _fresh(toy)
    real = vlm.save
    monkeypatch.setattr(vlm, "save", lambda path: events.append(("save",)) or real(path))
    ref = grpo_dist.write_ref(vlm, tmp_path)
    n = len(list(vlm.model.parameters()))
    assert events == [("gather", n), ("save",), ("release",)] and grpo_dist.ref_complete(ref)


def test_bad_arguments_fail_clearly(toy, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.train_grpo(_fresh(toy), toy[0], GRPORecipe(steps=1, batch_size=6, num_generations=4), out_dir=tmp_path)
    # a group of one has no advantage: the recipe refuses it (pydantic, naming the field)
    with pytest.raises(ValidationError, match="num_generations"):
        GRPORecipe(steps=1, batch_size=4, num_generations=1)
    with pytest.raises(ValueError, match="mode"):
        grpo.train_grpo(_fresh(toy), toy[0], GRPORecipe(steps=1), mode="chatty", out_dir=tmp_path)


def test_plot_curves(tmp_path):
    df = pd.DataFrame({"step": [1, 2, 3], "reward": [0.1, 0.5, 1.0], "reward_format": [0.1, 0.4, 0.9],
                       "reward_accuracy": [0.0, 0.1, 0.1], "completion_length": [9, 8, 7],
                       "reward_clean": [0.2, 0.6, 1.1], "reward_adv": [0.0, 0.3, 0.8],
                       "adv_success_rate": [0.5, 0.4, 0.2]})
    fig = grpo.plot_curves({"AT-GRPO": df}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and len(fig.axes) == 6


# --------------------------------------------------------------------------- the zoo's GRPO models
@pytest.fixture(scope="module")
def zoo_over(tmp_path_factory):
    """Overrides of the smoke profile: a 16-image benchmark and models under a temporary folder, a
    small base and 2-step SFT (the smoke profile's GRPO recipes are 2 steps already)."""
    tmp = tmp_path_factory.mktemp("zoo")
    return {"model.dir": str(tmp / "models"), "data.bench_dir": str(tmp / "bench"), "data.n_images": 16,
            "model.tiny.copy_steps": 5, "model.tiny.vision_steps": 5, "sft.nothink.steps": 2}


@pytest.fixture()
def grpo_calls(monkeypatch):
    """The (recipe, trained VLM) of every grpo.train_grpo call (the zoo's GRPO runs call it)."""
    calls, real = [], grpo.train_grpo

    def spy(vlm, items, recipe, **kw):
        out = real(vlm, items, recipe, **kw)
        calls.append((recipe, out))
        return out
    monkeypatch.setattr(grpo, "train_grpo", spy)
    return calls


def test_zoo_grpo_trains_once_then_loads_and_retrains_on_another_recipe(zoo_over, grpo_calls):
    cfg = config.load("smoke", zoo_over)
    path = zoo.ensure("grpo-nothink", cfg)
    assert len(grpo_calls) == 1
    assert zoo.ensure("grpo-nothink", cfg) == path and len(grpo_calls) == 1  # cached: no training
    assert zoo.is_trained("grpo-nothink", cfg)
    # the model on disk is the one GRPO trained
    assert torch.equal(_weights(zoo.load("grpo-nothink", cfg)), _weights(grpo_calls[0][1]))
    run_dir = zoo.run_dir("grpo-nothink", cfg)
    done = runs.read_done(run_dir)
    assert done["key"]["recipe"] == cfg.safemed.grpo.nothink.key() and done["key"]["recipe"]["steps"] == 2
    assert done["key"]["adversarial"] is None and done["key"]["kind"] == "grpo"
    assert grpo.read_log(run_dir / "train")["step"].tolist() == [1, 2]  # TRL's run in <run_dir>/train
    other = config.load("smoke", {**zoo_over, "safemed.grpo.nothink.lr": 2e-3})  # another recipe: retrains
    assert not zoo.is_trained("grpo-nothink", other)
    zoo.ensure("grpo-nothink", other)
    assert len(grpo_calls) == 2 and grpo_calls[-1][0].lr == 2e-3
    assert runs.read_done(run_dir)["key"]["recipe"]["lr"] == 2e-3


def test_zoo_grpo_key_holds_its_parents_key(zoo_over, grpo_calls):
    cfg = config.load("smoke", zoo_over)
    key = zoo.key("grpo-nothink", cfg)
    assert key["parent"] == zoo.key("sft-nothink", cfg) and key["parent"]["parent"] == zoo.key("base", cfg)
    zoo.ensure("grpo-nothink", cfg)
    n = len(grpo_calls)
    # another SFT recipe upstream: another parent, so another GRPO model (trained from the new SFT model)
    other = config.load("smoke", {**zoo_over, "sft.nothink.lr": 2e-3})
    assert zoo.key("grpo-nothink", other)["parent"] == zoo.key("sft-nothink", other) != key["parent"]
    assert zoo.fingerprint("grpo-nothink", other) != zoo.fingerprint("grpo-nothink", cfg)
    assert not zoo.is_trained("grpo-nothink", other)
    zoo.ensure("grpo-nothink", other)
    assert len(grpo_calls) == n + 1 and zoo.is_trained("sft-nothink", other)


# --------------------------------------------------------------------------- the recipe script
def _script():
    spec = importlib.util.spec_from_file_location("train_grpo_script", ROOT / "scripts/train_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RECIPES = sorted((ROOT / "configs/recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_file_is_a_valid_typed_recipe(path):
    r = _script().parse(["--config", str(path)])
    assert isinstance(r.grpo, GRPORecipe) and r.output_dir
    if r.adversarial is not None:  # in the profiles' unit: 8 means 8/255
        assert (r.adversarial.eps, r.adversarial.alpha, r.adversarial.norm) == (8, 2, "linf")


def test_train_recipe_units_overrides_and_unknown_keys(tmp_path):
    tg = _script()
    at = str(ROOT / "configs/recipes/tiny_at_grpo.yaml")
    r = tg.parse(["--config", at, "--grpo.steps", "2", "--adversarial.fraction", "1.0", "--seed", "3",
                  "--output_dir", str(tmp_path / "o"), "--data.train_filter.modality", "CT", "--lora", "null"])
    assert (r.grpo.steps, r.adversarial.fraction, r.seed, r.lora) == (2, 1.0, 3, None)
    assert r.output_dir == str(tmp_path / "o")
    assert r.data.train_filter == {"modality": "CT"} and r.grpo.lr == 1e-4  # the rest from the file
    adv = r.adversarial.pixels()  # L-inf eps / alpha: 1/255 in the recipe, [0, 1] pixels for the trainer
    assert isinstance(adv, at_grpo.AdversarialConfig)
    assert (adv.eps, adv.alpha) == (pytest.approx(8 / 255), pytest.approx(2 / 255))
    assert (adv.steps, adv.fraction, adv.ramp_steps, adv.norm) == (5, 1.0, 10, "linf")
    l2 = tg.parse(["--config", at, "--adversarial.norm", "l2", "--adversarial.eps", "0.5",
                   "--adversarial.alpha", "0.1"]).adversarial.pixels()
    assert (l2.eps, l2.alpha) == (0.5, 0.1)  # an L2 radius is already in pixel units
    plain = str(ROOT / "configs/recipes/tiny_grpo.yaml")
    assert tg.parse(["--config", plain]).adversarial is None
    assert tg.parse(["--config", plain, "--adversarial.steps", "1"]).adversarial.eps == 8  # a block from overrides
    assert tg.parse(["--config", at, "--adversarial", "null"]).adversarial is None
    # unknown keys, in an override or in the file, are errors naming the key
    with pytest.raises(config.ConfigError, match=r"'grpo\.stepz'.*'grpo\.steps'"):
        tg.parse(["--config", at, "--grpo.stepz", "2"])
    with pytest.raises(config.ConfigError, match=r"unknown recipe key 'steps'"):
        tg.parse(["--config", at, "--steps", "2"])  # the flat keys of the old recipes
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: o\ndata: {n_image: 40}\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml.*'data\.n_image'"):
        tg.parse(["--config", str(bad)])
    with pytest.raises(config.ConfigError, match="grpo.num_generations"):
        tg.parse(["--config", at, "--grpo.num_generations", "1"])
    with pytest.raises(config.ConfigError, match="1/255"):  # eps given in [0, 1] pixels by mistake
        tg.parse(["--config", at, "--adversarial.eps", "0.0313725"])
    with pytest.raises(SystemExit, match="n_image"):  # main reports it without a traceback
        tg.main(["--config", str(bad)])


def test_script_config_before_model_no_gpu_move_under_zero3_and_timeout(tmp_path, monkeypatch):
    """Under DeepSpeed ZeRO-3 the training config (which sets up transformers' DeepSpeed config) must
    exist before the model loads (zero.Init), and the script must not move the weights to the GPU;
    the process group is created with the recipe's ddp_timeout, which the config gets too."""
    import accelerate

    tg, calls, states = _script(), [], []

    class FakeState:
        is_main_process, local_process_index = True, 0

        def __init__(self, **kwargs):
            states.append(kwargs)

        def main_process_first(self):
            return contextlib.nullcontext()

        def wait_for_everyone(self):
            pass

    class FakeVLM:
        train_info = {"num_processes": 1}

        def to(self, device):
            calls.append(("to", str(device)))
            return self

    items = toy_items(tmp_path)
    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(dataset, "load_items", lambda *a, **kw: items)
    monkeypatch.setattr(grpo, "grpo_config", lambda *a, **kw: calls.append(("config", kw["ddp_timeout"])) or "cfg")
    monkeypatch.setattr(models, "build_tiny_vlm", lambda *a, **kw: calls.append(("load",)) or FakeVLM())
    monkeypatch.setattr(grpo, "train_grpo", lambda vlm, *a, **kw: calls.append(("train", kw["config"])) or vlm)
    (tmp_path / "o").mkdir()
    argv = ["--config", str(ROOT / "configs/recipes/tiny_grpo.yaml"), "--output_dir", str(tmp_path / "o"),
            "--device", "cuda", "--ddp_timeout", "600"]
    for zero3, moves in ((True, []), (False, [("to", "cuda:0")])):
        calls.clear()
        monkeypatch.setattr(grpo_dist, "zero3_enabled", lambda: zero3)
        tg.main(argv)
        assert [c for c in calls if c[0] != "to"] == [("config", 600), ("load",), ("train", "cfg")]
        assert [c for c in calls if c[0] == "to"] == moves
        assert states[-1] == {"cpu": False, "timeout": timedelta(seconds=600)}
    assert tg.parse(["--config", str(ROOT / "configs/recipes/tiny_grpo.yaml")]).ddp_timeout == 1800


# --------------------------------------------------------------------------- distributed (slow)
@pytest.mark.slow
def test_accelerate_two_cpu_processes(tmp_path):
    """accelerate launch, 2 processes on the CPU (gloo), scripts/train_grpo.py, 2 AT-GRPO steps, the final save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "29531",
           str(ROOT / "scripts/train_grpo.py"), "--config", str(ROOT / "configs/recipes/tiny_at_grpo.yaml"),
           "--output_dir", str(out), "--data.bench_dir", str(tmp_path / "bench"), "--data.n_images", "40",
           "--data.image_size", "56", "--grpo.steps", "2", "--grpo.batch_size", "4",
           "--grpo.max_completion_length", "6", "--adversarial.steps", "1", "--adversarial.ramp_steps", "0",
           "--save_steps", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170, cwd=ROOT)
    (tmp_path / "launch.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["num_processes"] == 2
    assert meta["grpo"]["steps"] == 2 and meta["adversarial"]["eps"] == 8  # the recipe, in its own units
    log = grpo.read_log(out)
    # ... and the trainer attacked with eps = 8/255 in pixel units
    assert log["step"].tolist() == [1, 2] and log["adv_eps"].iloc[-1] == pytest.approx(8 / 255, rel=1e-3)
    # the final model: saved by the trainer's own save on every process (ZeRO-3/FSDP-safe; its
    # training_args.bin marks it), reloadable, and the weights of the final checkpoint
    assert (out / "model" / "training_args.bin").is_file()
    saved = models.load_vlm(out / "model")
    assert saved.image_size == 56
    final = models.load_vlm(out / "checkpoint-2", image_size=56).model.state_dict()
    state = saved.model.state_dict()
    assert state.keys() == final.keys() and all(torch.equal(state[k], v) for k, v in final.items())


@pytest.mark.slow
@pytest.mark.parametrize("attack", [False, True], ids=["grpo", "at_grpo_one_rank_attacks"])
def test_fsdp_two_processes_sharded_training_and_save(tmp_path, attack):
    """FSDP2 with configs/accelerate/fsdp.yaml's launch settings, 2 CPU processes: the parameters are
    really sharded (half of each tensor per process) and the final save, made through the trainer's
    own save on both processes, holds the full trained weights (the old main-process-only
    ``vlm.save`` fails on the sharded parameters). AT-GRPO where only rank 0 attacks finishes."""
    env = {k: v for k, v in launch_env(ROOT / "configs/accelerate/fsdp.yaml").items()
           if k.startswith(("FSDP_", "ACCELERATE_"))}
    env["ACCELERATE_MIXED_PRECISION"] = "no"  # bf16 autocast is a CUDA setting (fp32 on the CPU)
    torchrun("fsdp_save_two_ranks.py", tmp_path, port=29547 + attack, env=env, args=["--attack"] * attack)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert [r.get("attacked_images", 0) for r in ranks] == ([2, 0] if attack else [0, 0])
    for r in ranks:  # every parameter a DTensor, each process holding half of the elements
        assert r["dtensors"] == r["params"] > 0 and r["local_numel"] * 2 == r["numel"]
    full, init = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "init.pt")
    assert all(not torch.equal(full[n], init[n]) for n in init)  # trained: every tensor moved
    saved = dict(models.load_vlm(tmp_path / "model").model.named_parameters())
    assert saved.keys() == full.keys() and all(torch.equal(saved[n], full[n]) for n in full)
