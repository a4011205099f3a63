"""The model zoo: names, keys that chain to the parent, aliases, checkpoints by path."""
import pytest

from safemed_lib import base, config, data, models, synth, zoo

SIZE = 56


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    root = synth.ensure_benchmark(tmp / "bench", n_images=16, seed=0, size=SIZE)
    items = data.load_omnimedvqa(root)
    ckpt = tmp / "ckpt"
    models.build_tiny_vlm(base.corpus_texts(items), seed=0, image_size=SIZE, hidden_size=32, layers=2).save(ckpt)
    return tmp, root, ckpt


def _cfg(tmp, **over):
    return config.load("smoke", {"data.bench_dir": str(tmp / "bench"), "data.n_images": 16, "data.image_size": SIZE,
                                 "model.dir": str(tmp / "models"), **over})


def test_names_keys_and_run_dirs(setup):
    tmp, _, _ = setup
    cfg = _cfg(tmp)
    names = zoo.names(cfg)
    assert {"base", "sft-think", "atgrpo-nothink", "r2-plain", "medr1-warmup",
            "medr1-modality-grpo-ct", "medr1-question-type-sft-disease-diagnosis"} <= set(names)
    k = zoo.key("atgrpo-nothink", cfg)
    assert k["kind"] == "at-grpo" and k["parent"]["kind"] == "sft" and k["parent"]["parent"]["kind"] == "tiny-base"
    assert k["adversarial"]["eps"] == pytest.approx(cfg.safemed.train_attack.eps / 255)  # pixel units in the key
    assert zoo.run_dir("sft-think", cfg) == cfg.models_dir / "sft-think"
    # a change upstream changes every key below it, and nothing beside it
    other = _cfg(tmp, **{"sft.nothink.lr": 0.01})
    assert zoo.key("atgrpo-nothink", other) != k and zoo.key("sft-think", other) == zoo.key("sft-think", cfg)
    # threads are not part of a model's identity
    assert zoo.key("sft-nothink", _cfg(tmp, **{"sft.nothink.threads": 2})) == zoo.key("sft-nothink", cfg)
    with pytest.raises(KeyError, match="unknown model 'sft-thnk'"):
        zoo.spec("sft-thnk", cfg)
    with pytest.raises(KeyError, match="no modality group 'xray'"):
        zoo.spec("medr1-modality-sft-xray", cfg)


def test_a_checkpoint_is_the_base_and_medr1_warmup_an_alias(setup):
    tmp, _, ckpt = setup
    cfg = _cfg(tmp, **{"model.path": str(ckpt)})
    assert zoo.key("base", cfg) == str(ckpt) and zoo.is_trained("base", cfg)
    assert zoo.ensure("base", cfg) == ckpt
    assert zoo.key("medr1-warmup", cfg) == str(ckpt)  # a pretrained checkpoint is Med-R1's base itself
    assert zoo.key("sft-nothink", cfg)["parent"] == str(ckpt)
    vlm = zoo.load("base", cfg)
    assert vlm.image_size == SIZE and not zoo.is_trained("sft-nothink", cfg)


def test_load_a_directory_by_path(setup):
    tmp, _, ckpt = setup
    cfg = _cfg(tmp)
    assert isinstance(zoo.load(ckpt, cfg), models.VLM)
    assert isinstance(zoo.load(str(ckpt), cfg), models.VLM)
