"""The VLM wrapper: preprocessing parity with the HF processor, scoring, generation, save/load, LoRA."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safemed_lib import models, prompts
from safemed_lib.data import VQAItem


def make_item(qid, question, options, answer="A"):
    return VQAItem(question_id=qid, dataset="Synth", image_path=Path(f"/data/Images/Synth/{qid}.png"),
                   question=question, options=list(options), answer=answer, modality="CT",
                   question_type="Modality Recognition")


ITEMS = [make_item("q0", "What imaging technique was used?", ["CT scan", "MRI", "X-Ray", "Fundus imaging"], "A"),
         make_item("q1", "Is the lesion benign or malignant?", ["benign", "malignant"], "B"),
         make_item("q2", "Which organ is shown?", ["liver", "lung", "kidney"], "C")]
CORPUS = [prompts.format_problem(it) for it in ITEMS] + ["The image shows a round bright lesion in the liver."]
SMALL = dict(hidden_size=64, layers=2, vision_depth=1, vision_dim=32)


@pytest.fixture(scope="module")
def vlm():
    return models.build_tiny_vlm(CORPUS, seed=0, image_size=56, **SMALL)


@pytest.fixture(scope="module")
def saved(vlm, tmp_path_factory):
    return vlm.save(tmp_path_factory.mktemp("ckpt") / "tiny")


def images(n, h=56, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def logits(vlm, x, items, mode="nothink"):
    with torch.no_grad():
        inputs, _ = vlm._encode(x, items, mode)
        return vlm.model(**inputs).logits


# ------------------------------------------------------------------ preprocessing

@pytest.mark.parametrize("h, w", [(56, 56), (56, 84), (112, 56), (224, 168), (168, 224)])
def test_preprocess_matches_hf_pil_processor(vlm, h, w):
    x = images(2, h, w, seed=h + w)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in x]
    ref = vlm.processor.image_processor(pil, return_tensors="pt")
    pv, grid = vlm.preprocess(x)
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, h // 14, w // 14]] * 2
    assert pv.shape == ref["pixel_values"].shape == (2 * (h // 14) * (w // 14), 3 * 2 * 14 * 14)
    assert (pv - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_preprocess_list_of_sizes_and_errors(vlm):
    pv, grid = vlm.preprocess([images(1, 56, 84)[0], images(1, 84, 56)[0]])
    assert grid.tolist() == [[1, 4, 6], [1, 6, 4]] and pv.shape[0] == 48
    with pytest.raises(ValueError, match="multiples of 28"):
        vlm.preprocess(torch.rand(1, 3, 60, 56))
    with pytest.raises(ValueError, match="outside the processor's range"):
        vlm.preprocess(torch.rand(1, 3, 28, 28))  # the HF processor would upscale it to 56x56
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        vlm.preprocess(torch.rand(2, 1, 56, 56))
    with pytest.raises(ValueError, match="float"):
        vlm.preprocess(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_batched_preprocess_equals_the_per_image_path_and_keeps_gradients(vlm):
    x = images(3, 112, 56, seed=3).requires_grad_(True)
    pv, grid = vlm.preprocess(x)  # one batched reshape
    pv_list, grid_list = vlm.preprocess(list(x))  # image by image
    assert torch.equal(pv, pv_list) and grid.tolist() == grid_list.tolist() == [[1, 8, 4]] * 3
    (g,) = torch.autograd.grad(pv.sum(), x)
    assert g.abs().sum() > 0


def test_prompt_ids_are_memoized_and_equal_fresh_tokenization(vlm, monkeypatch):
    fresh = vlm.tokenizer(vlm.chat_prompt(ITEMS[0], "think", 4), add_special_tokens=False)["input_ids"]
    vlm._prompt_ids.clear()
    calls = []
    render = vlm.chat_prompt
    monkeypatch.setattr(vlm, "chat_prompt", lambda *a, **k: calls.append(a) or render(*a, **k))
    assert vlm.prompt_ids(ITEMS[0], "think", 4) == fresh
    assert vlm.prompt_ids(ITEMS[0], "think", 4) == fresh and len(calls) == 1  # served from the memo
    assert vlm.prompt_ids(ITEMS[0], "nothink", 4) != fresh and len(calls) == 2  # another prompt
    vlm.cache_prompts = False
    try:
        assert vlm.prompt_ids(ITEMS[0], "think", 4) == fresh and len(calls) == 3  # memo off: rendered again
    finally:
        vlm.cache_prompts = True
    monkeypatch.setattr("safemed_lib.models.vlm.PROMPT_CACHE_SIZE", 2)  # read where VLM.prompt_ids lives
    vlm.prompt_ids(ITEMS[1], "think", 4)  # third prompt: the full memo is cleared first
    assert len(vlm._prompt_ids) == 1


def test_wrapper_refuses_a_processor_it_cannot_mirror(vlm):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(do_normalize=False)
    processor = models.image_only_processor(ip, vlm.tokenizer, models.CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="rescale by 1/255 and normalize"):
        models.VLM(vlm.model, processor, arch="qwen2_vl")
    with pytest.raises(ValueError, match="unsupported arch"):
        models.VLM(vlm.model, vlm.processor, arch="llava")


def test_encoding_matches_the_hf_processor_call(vlm):
    """Our prompt + placeholder expansion equals what the processor itself produces (TRL's path)."""
    x = images(1, 56, 84)
    text = vlm.chat_prompt(ITEMS[0], "think")
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    ref = vlm.processor(text=[text], images=[pil], return_tensors="pt")
    inputs, _ = vlm._encode(x, ITEMS[:1], "think")
    assert inputs["input_ids"].tolist() == ref["input_ids"].tolist()
    assert inputs["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"].tolist()
    assert int((inputs["input_ids"] == vlm.processor.image_token_id).sum()) == 4 * 6 // 4
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ scoring and generation

def test_sequence_nll_gradient_reaches_pixels_and_batch_is_padding_invariant(vlm):
    x = images(3).requires_grad_(True)
    targets = [prompts.format_completion(it.answer, "nothink") for it in ITEMS]
    nll = vlm.sequence_nll(x, ITEMS, targets, prompt="nothink")
    assert nll.shape == (3,) and torch.isfinite(nll).all()
    nll.sum().backward()
    assert x.grad is not None and (x.grad != 0).float().mean() > 0.99
    # rows of different prompt/target lengths are left padded: each equals its unbatched value
    with torch.no_grad():
        alone = torch.cat([vlm.sequence_nll(x[i:i + 1], ITEMS[i:i + 1], targets[i:i + 1]) for i in range(3)])
    assert torch.allclose(nll.detach(), alone, atol=1e-5)
    total = vlm.sequence_nll(x, ITEMS, targets, reduction="sum").detach()
    n_tokens = torch.tensor([len(vlm._target_ids(t, True)) for t in targets], dtype=torch.float)
    assert torch.allclose(total, nll.detach() * n_tokens, atol=1e-4)


def test_option_logprobs_agree_with_sequence_nll(vlm):
    x = images(3, seed=5)
    with torch.no_grad():
        lp = vlm.option_logprobs(x, ITEMS, prompt="nothink")
        assert [t.shape[0] for t in lp] == [4, 2, 3]
        prefix = vlm.sequence_nll(x, ITEMS, ["<answer>"] * 3, reduction="sum", add_eos=False)
        for letter_index in range(2):
            letter = prompts.LETTERS[letter_index]
            full = vlm.sequence_nll(x, ITEMS, [f"<answer> {letter}"] * 3, reduction="sum", add_eos=False)
            expected = -(full - prefix)
            got = torch.stack([t[letter_index] for t in lp])
            assert torch.allclose(got, expected, atol=1e-4)
    assert all((t < 0).all() for t in lp)


def test_image_embeds_stand_in_for_the_images_bit_for_bit(vlm):
    """The vision tower's output, once computed (alone or in any batch), scores like the images."""
    x = images(3, seed=2)
    targets = [prompts.format_completion(it.answer, "nothink") for it in ITEMS]
    with torch.no_grad():
        whole = vlm.encode_images(x)
        alone = [vlm.encode_images(x[i:i + 1]) for i in range(3)]
        assert whole.embeds.shape == (3, 4, 64) and whole.grid.tolist() == [[1, 4, 4]] * 3 and len(whole) == 3
        stacked = models.ImageEmbeds.stack([(e.embeds[0], e.grid[0]) for e in alone])
        for given in (whole, stacked):
            assert torch.equal(vlm.sequence_nll(given, ITEMS, targets), vlm.sequence_nll(x, ITEMS, targets))
            assert all(torch.equal(a, b) for a, b in zip(vlm.option_logprobs(given, ITEMS), vlm.option_logprobs(x, ITEMS)))
        other = vlm.encode_images(images(1, h=84, w=56))
    with pytest.raises(ValueError, match="different token counts"):
        models.ImageEmbeds.stack([(whole.embeds[0], whole.grid[0]), (other.embeds[0], other.grid[0])])
    with pytest.raises(ValueError, match="2 images for 3 items"):
        vlm.sequence_nll(models.ImageEmbeds(whole.embeds[:2], whole.grid[:2]), ITEMS, targets)
    with pytest.raises(TypeError, match="generate takes images, not ImageEmbeds"):
        vlm.generate(whole, ITEMS, max_new_tokens=2)


def test_generate_batch_with_different_prompts(vlm):
    x = images(3, seed=1)
    modes = ["think", "nothink", "think_after"]
    out = vlm.generate(x, ITEMS, prompt=modes, max_new_tokens=6)
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    # batched (left padded) greedy decoding equals decoding each item alone
    alone = [vlm.generate(x[i:i + 1], ITEMS[i:i + 1], prompt=modes[i], max_new_tokens=6)[0] for i in range(3)]
    assert out == alone
    assert not vlm.model.training


def test_build_is_deterministic_per_seed(vlm):
    again = models.build_tiny_vlm(CORPUS, seed=0, image_size=56, **SMALL)
    other = models.build_tiny_vlm(CORPUS, seed=1, image_size=56, **SMALL)
    assert again.tokenizer.get_vocab() == vlm.tokenizer.get_vocab()
    a, b, c = (m.model.state_dict() for m in (vlm, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    letters = vlm.letter_token_ids(5)
    assert len(set(letters)) == 5
    assert [vlm.tokenizer.decode([i]) for i in letters] == [" A", " B", " C", " D", " E"]


def test_rope_theta_reaches_the_config_and_only_moves_positions(vlm):
    low = models.build_tiny_vlm(CORPUS, seed=0, image_size=56, rope_theta=100.0, **SMALL)
    rope = low.model.config.text_config.rope_parameters
    assert rope["rope_theta"] == 100.0 and vlm.model.config.text_config.rope_parameters["rope_theta"] == 1e4
    a, b = vlm.model.state_dict(), low.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "inv_freq" not in k)
    x = images(2, seed=5)
    assert not torch.allclose(logits(vlm, x, ITEMS[:2]), logits(low, x, ITEMS[:2]), atol=1e-4)


# ------------------------------------------------------------------ save / load

def test_save_writes_safetensors_and_round_trips(vlm, saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.SETTINGS_FILE} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert json.loads((saved / models.SETTINGS_FILE).read_text())["image_size"] == 56
    loaded = models.load_vlm(saved)
    assert loaded.image_size == 56 and loaded.arch == "qwen2_vl"
    assert type(loaded.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    x = images(2, seed=3)
    assert torch.allclose(logits(vlm, x, ITEMS[:2]), logits(loaded, x, ITEMS[:2]), atol=1e-6)


def to_official_layout(src: Path, dst: Path) -> Path:
    """Rewrite a saved checkpoint the way Qwen/Qwen2-VL-*-Instruct ships: flat config.json, sharded
    safetensors with an index, preprocessor_config.json of the torchvision image processor class,
    chat_template.json."""
    loaded = models.load_vlm(src)
    dst.mkdir(parents=True)
    loaded.model.save_pretrained(dst, safe_serialization=True, max_shard_size="100KB")
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg.pop("text_config")
    cfg.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    (dst / "config.json").write_text(json.dumps(cfg))
    loaded.tokenizer.save_pretrained(dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": models.CHAT_TEMPLATE}))
    ip = loaded.processor.image_processor
    (dst / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}))
    return dst


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_official_layout_loads_for_both_architectures(arch, tmp_path):
    vlm = models.build_tiny_vlm(CORPUS, seed=0, image_size=56, arch=arch, **SMALL)
    src = vlm.save(tmp_path / "ours")
    official = to_official_layout(src, tmp_path / "official")
    assert len(list(official.glob("*.safetensors"))) > 1 and (official / "model.safetensors.index.json").is_file()
    loaded = models.load_vlm(official, dtype="float32")
    expected_class = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                      "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[arch]
    assert type(loaded.model).__name__ == expected_class and loaded.arch == arch
    assert loaded.image_size is None and models.load_vlm(official, image_size=56).image_size == 56
    assert loaded.processor.image_processor.size["longest_edge"] == 12845056
    x = images(2, seed=4)
    assert torch.allclose(logits(vlm, x, ITEMS[:2]), logits(loaded, x, ITEMS[:2]), atol=1e-5)
    out = loaded.generate(x, ITEMS[:2], prompt="nothink", max_new_tokens=3)
    assert out == vlm.generate(x, ITEMS[:2], prompt="nothink", max_new_tokens=3)


def test_unsupported_directories_are_refused(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_vlm(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json.*found: nothing"):
        models.load_vlm(empty)
    wrong = tmp_path / "llava"
    shutil.copytree(saved, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type is 'llava'"):
        models.load_vlm(wrong)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(found \['pytorch_model.bin'\]\)"):
        models.load_vlm(pickled)


# ------------------------------------------------------------------ LoRA

def test_lora_attach_save_load_merge_round_trip(saved, tmp_path):
    vlm = models.load_vlm(saved, lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = images(2, seed=6)
    base = logits(models.load_vlm(saved), x, ITEMS[:2])
    assert torch.allclose(logits(vlm, x, ITEMS[:2]), base, atol=1e-6)  # B starts at zero
    opt = torch.optim.SGD([p for p in vlm.model.parameters() if p.requires_grad], lr=1.0)
    vlm.model.train()
    vlm.sequence_nll(x, ITEMS[:2], ["<answer> A </answer>", "<answer> B </answer>"]).mean().backward()
    opt.step()
    vlm.model.eval()
    tuned = logits(vlm, x, ITEMS[:2])
    assert not torch.allclose(tuned, base, atol=1e-4)
    adapter = vlm.save(tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="LoRA adapter"):
        models.load_vlm(adapter)
    reloaded = models.load_vlm(saved, lora=adapter)
    assert torch.allclose(logits(reloaded, x, ITEMS[:2]), tuned, atol=1e-5)
    merged = reloaded.merge_lora()
    assert not hasattr(merged.model, "peft_config")
    assert torch.allclose(logits(merged, x, ITEMS[:2]), tuned, atol=1e-5)
    full = models.load_vlm(merged.save(tmp_path / "merged"))
    assert torch.allclose(logits(full, x, ITEMS[:2]), tuned, atol=1e-5)


def test_attention_implementation_is_chosen_at_load_and_checked(saved, monkeypatch):
    assert models.load_vlm(saved, attn_implementation="eager").model.config._attn_implementation == "eager"
    assert models.load_vlm(saved, attn_implementation="sdpa").model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        models.load_vlm(saved, attn_implementation="flash")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    with pytest.raises(ValueError, match="flash-attn package"):
        models.load_vlm(saved, attn_implementation="flash_attention_2")


def test_zoo_loads_with_the_profiles_attention_implementation(saved):
    from safemed_lib import config, zoo

    cfg = config.load("smoke", {"model.attn_implementation": "eager", "data.image_size": 56})
    assert zoo.load(saved, cfg).model.config._attn_implementation == "eager"


def test_sequence_nll_scores_a_set_of_tokens_against_the_uniform_distribution(vlm):
    x = images(3, seed=7)
    targets = [prompts.format_completion(it.answer, "nothink") for it in ITEMS]
    sets = [vlm.letter_token_ids(len(it.options)) for it in ITEMS]
    total = vlm.sequence_nll(x, ITEMS, targets, reduction="sum").detach()
    uni = vlm.sequence_nll(x, ITEMS, targets, reduction="sum", uniform_over=sets).detach()
    with torch.no_grad():  # the letter's term -log p(letter | "<answer>") becomes -mean over the option letters
        lp = vlm.option_logprobs(x, ITEMS, prompt="nothink")
    letter = torch.stack([-lp[b][prompts.LETTERS.index(it.answer)] for b, it in enumerate(ITEMS)])
    assert torch.allclose(total - uni, letter + torch.stack([lp[b].mean() for b in range(3)]), atol=1e-4)
    # which letter the target names does not matter (up to the letter: later tokens are conditioned on it)
    upto = [f"{prompts.ANSWER_PREFIX} {it.answer}" for it in ITEMS]
    other = [f"{prompts.ANSWER_PREFIX} {prompts.LETTERS[(prompts.LETTERS.index(it.answer) + 1) % len(it.options)]}"
             for it in ITEMS]
    a, b = (vlm.sequence_nll(x, ITEMS, t, reduction="sum", add_eos=False, uniform_over=sets).detach()
            for t in (upto, other))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="uniform_over has 2 rows"):
        vlm.sequence_nll(x, ITEMS, targets, uniform_over=sets[:2])
