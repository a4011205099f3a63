"""benchmarks/gpu_check.py without a GPU: a clear "skipped" record, no failure."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run for real")
def test_gpu_check_skips_with_its_reason_without_cuda(tmp_path, capsys):
    record = gpu_check.main(["--out", str(tmp_path)])
    assert record["status"] == "skipped" and "no CUDA device" in record["reason"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == record
    assert "no CUDA device" in (tmp_path / "gpu_check.md").read_text()  # benchmarks/run.py shows it
    assert "SKIPPED: no CUDA device" in capsys.readouterr().out


def test_gpu_check_code_path_attacks_in_the_at_grpo_run(tmp_path, monkeypatch):
    """--cpu-smoke with narrow widths (the real ones take minutes on a CPU): both runs train, the
    AT-GRPO run attacks (an earlier version silently timed AT-GRPO without its attack)."""
    narrow = dict(text=dict(gpu_check.QWEN2_VL_2B["text"], hidden_size=64, intermediate_size=128,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, mrope_section=[2, 3, 3]),
                  vision=dict(gpu_check.QWEN2_VL_2B["vision"], embed_dim=32, num_heads=2))
    monkeypatch.setattr(gpu_check, "QWEN2_VL_2B", narrow)
    from safemed_lib import attacks

    targets, real = [], attacks.attack_loss
    monkeypatch.setattr(attacks, "attack_loss", lambda vlm, items, **kw: targets.append(
        (vlm.tokenizer, kw["clean_outputs"])) or real(vlm, items, **kw))
    record = gpu_check.main(["--cpu-smoke", "--max-len", "24", "--pgd-steps", "1", "--batch-size", "8", "--g", "4",
                             "--out", str(tmp_path)])
    runs = {r["kind"]: r for r in record["runs"]}
    assert record["status"] == "ok" and set(runs) == {"grpo", "at-grpo"}
    assert runs["at-grpo"]["attacked_share"] == 1.0 and runs["at-grpo"]["attack_s_median"] > 0
    assert "attacked_share" not in runs["grpo"]
    md = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert "| at-grpo |" in md and "| 1.00 |" in md
    # the think attack scored a reasoning of the completion length, not a bare answer
    assert targets and all(len(tok(t, add_special_tokens=False)["input_ids"]) >= 24 and "<think>" in t
                           for tok, outs in targets for t in outs.values())


def test_gpu_check_defaults_are_the_paper_recipes():
    import yaml

    r = yaml.safe_load(gpu_check.RECIPE.read_text())
    d = gpu_check._recipe_defaults()
    assert d["max_len"] == r["grpo"]["max_completion_length"] and d["pgd_steps"] == r["adversarial"]["steps"]
    assert d["gradient_checkpointing"] is True and d["g"] == r["grpo"]["num_generations"]


def test_synthetic_reasoning_has_the_length_and_the_answer_block():
    from safemed_lib import models, prompts

    tok = models.build_tiny_vlm(["a b c"] * 3, image_size=56, hidden_size=64).tokenizer
    text = gpu_check.synthetic_reasoning(tok, 64)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) in range(64, 70)
    assert prompts.parse_answer(text, 4) == "A" and text.startswith("<think>")
