"""GPU check: a real-size Qwen2-VL-2B (random weights) trained with GRPO and AT-GRPO at 392x392, bf16.

No download: the model is built from a config with Qwen2-VL-2B-Instruct's dimensions (text:
hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings;
vision: 32 blocks, width 1280, 16 heads, MLP ratio 4, patch 14, merge 2) around the tiny
model's tokenizer and processor. The run's settings default to the paper recipe
(``configs/recipes/paper_at_grpo.yaml``: completions per step, group size, completion length,
PGD steps, gradient checkpointing), so the timings are those of a paper-profile step.

What random weights would get wrong, and how it is avoided:
- they emit ids outside the tiny vocabulary, which decode to nothing: rewards are 0 and every
  completion runs to the full length (a worst-case rollout timing, kept);
- the think-mode attack scores the policy's own clean reasoning followed by the answer; decoded
  to nothing, that target would shrink to the short answer and PGD's passes would be timed on a
  few tokens. The attack's clean generation still runs in full, and its text is replaced by a
  fixed synthetic reasoning of the completion length (:func:`synthetic_reasoning`).
Between the GRPO and the AT-GRPO run the first model, its trainer and the CUDA cache are freed,
and the memory still allocated when each run starts is recorded (``start_memory_gib``).

Records seconds per step (median after a warm-up step) and peak GPU memory for a few GRPO and
AT-GRPO steps (PGD 8/255, step 2/255, ``--pgd-steps`` steps, a ``--fraction`` of the questions
attacked: all by default, because with few questions a step a random half leaves some timed steps
without any attack; the share attacked is recorded).

Without a CUDA device it writes a "skipped" record with the reason and exits 0;
``--cpu-smoke`` runs the same code path on the CPU with a 2-layer model of the same widths
(checks the script, not the timings).

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "recipes" / "paper_at_grpo.yaml"

QWEN2_VL_2B = dict(
    text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
              mrope_section=[16, 24, 24], tie_word_embeddings=True),
    vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
)


def build_model(layers: int | None, vision_depth: int | None, dtype, image_size: int):
    """A Qwen2-VL-2B-sized VLM with random weights (optionally fewer layers for the CPU smoke run)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from safemed_lib import models

    tiny = models.build_tiny_vlm(["a question", "an answer"], image_size=image_size)  # tokenizer + processor
    tok = tiny.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS}
    t, v = QWEN2_VL_2B["text"], QWEN2_VL_2B["vision"]
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=layers or t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=t["max_position_embeddings"],
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=t["tie_word_embeddings"],
                rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                                 "mrope_section": t["mrope_section"]})
    vision = dict(v, depth=vision_depth or v["depth"], hidden_size=t["hidden_size"])
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids[models.IMAGE_TOKEN],
                           video_token_id=ids[models.VIDEO_TOKEN], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=t["tie_word_embeddings"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(dtype)
    return models.VLM(model, tiny.processor, arch="qwen2_vl", image_size=image_size)


def synthetic_reasoning(tokenizer, n_tokens: int, letter: str = "A") -> str:
    """A fixed think-mode completion of ``n_tokens`` tokens: reasoning words, then the answer block."""
    tail = f" </think>\n<answer> {letter} </answer>"
    words = ("the image shows a region of higher intensity near the centre which suggests the finding "
             "described by the option so the answer follows from it ").split()
    text, i = "<think>", 0
    while len(tokenizer(text + tail, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " " + words[i % len(words)]
        i += 1
    return text + tail


def with_reasoning(vlm, n_tokens: int) -> None:
    """Make ``vlm.generate`` (the attack's clean generation; TRL's rollouts call the model directly)
    run in full, then answer with :func:`synthetic_reasoning` for every think-prompt item."""
    real, text = vlm.generate, synthetic_reasoning(vlm.tokenizer, n_tokens)

    def generate(images, items, prompt="think", **kw):
        out = real(images, items, prompt=prompt, **kw)
        return [text if prompt == "think" else o for o in out]

    vlm.generate = generate


def _recipe_defaults() -> dict:
    import yaml

    r = yaml.safe_load(RECIPE.read_text())
    g, adv = r["grpo"], r["adversarial"]
    return dict(image_size=r["data"]["image_size"], batch_size=g["batch_size"], g=g["num_generations"],
                max_len=g["max_completion_length"], pgd_steps=adv["steps"],
                gradient_checkpointing=r["gradient_checkpointing"])


def main(argv=None):
    d = _recipe_defaults()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=d["image_size"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"], help="completions per step (questions x G)")
    ap.add_argument("--g", type=int, default=d["g"])
    ap.add_argument("--max-len", type=int, default=d["max_len"], help="completion length (tokens)")
    ap.add_argument("--pgd-steps", type=int, default=d["pgd_steps"])
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each step's questions attacked")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    default=d["gradient_checkpointing"])
    ap.add_argument("--cpu-smoke", action="store_true", help="2 text layers, 2 vision blocks, 56 px, on the CPU")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args(argv)

    import torch

    from safemed_lib import data, dataset, grpo
    from safemed_lib.config import GRPORecipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check"
    record = {"benchmark": name, "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.cpu_smoke and not torch.cuda.is_available():
        record.update(status="skipped", reason="no CUDA device visible to torch "
                      f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); run it on a GPU machine")
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / f"{name}.md").write_text(f"# {name}: skipped\n\n{record['reason']}.\n")
        print(f"SKIPPED: {record['reason']}")
        return record

    if args.cpu_smoke:
        device, dtype, size, layers, depth, steps = "cpu", torch.float32, 56, 2, 2, 2
        torch.set_num_threads(1)
    else:
        device, dtype, size, layers, depth, steps = "cuda", torch.bfloat16, args.image_size, None, None, args.steps
        record["gpu"] = torch.cuda.get_device_name(0)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = dataset.load_items(None, tmp / "bench", n_images=40, image_size=size, seed=0)
        train, _ = data.split_by_image(items, test_frac=0.2, seed=0)
        recipe = GRPORecipe(steps=steps, lr=1e-6, num_generations=args.g, batch_size=args.batch_size, beta=0.04,
                            max_completion_length=args.max_len)
        for kind in ("grpo", "at-grpo"):
            start_memory = 0.0
            if device == "cuda":  # the previous run's model and trainer were freed below
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                start_memory = torch.cuda.memory_allocated() / 2 ** 30
            vlm = build_model(layers, depth, dtype, size).to(device)
            n_params = sum(p.numel() for p in vlm.model.parameters())
            adv = None if kind == "grpo" else dict(eps=8 / 255, alpha=2 / 255, steps=args.pgd_steps,
                                                   fraction=args.fraction, measure_success=False)
            if adv is not None:
                with_reasoning(vlm, args.max_len)
            t0 = time.perf_counter()
            vlm = grpo.train_grpo(vlm, train, recipe, mode="think", out_dir=tmp / kind, resume=False,
                                  save_steps=10 ** 6, device=device, lora=True if args.lora else None,
                                  gradient_checkpointing=args.gradient_checkpointing, image_size=size,
                                  adversarial=adv)
            wall = time.perf_counter() - t0
            log = grpo.read_log(tmp / kind)
            times = log["step_time"].tolist()
            run = {"kind": kind, "params": n_params, "steps": len(times), "wall_s": wall,
                   "start_memory_gib": start_memory,
                   "step_s_median": statistics.median(times[1:] or times), "step_s_all": times,
                   "completion_length": float(log["completion_length"].mean())}
            if kind == "at-grpo":  # no attack column at all: no step attacked anything
                run["attacked_share"] = float(log["adv_fraction"].mean()) if "adv_fraction" in log else 0.0
                if not run["attacked_share"] > 0:
                    raise RuntimeError("the AT-GRPO run attacked no question: its timing would be GRPO's "
                                       f"(fraction {args.fraction}, {len(times)} steps)")
                run["attack_s_median"] = float(log["adv_seconds"].dropna().median())
            if device == "cuda":
                run["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            runs.append(run)
            del vlm  # with its trainer: nothing of this run may count in the next run's peak
            gc.collect()
    record.update(status="ok", device=device, dtype=str(dtype), image_size=size, runs=runs)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {name}: Qwen2-VL-2B-sized random model, {size}x{size}, {record['dtype']}, {device}", "",
             "| run | params | step (s, median) | attack (s, median) | share attacked | memory at start (GiB) "
             "| peak memory (GiB) |", "|---|---|---|---|---|---|---|"]

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    for r in runs:
        lines.append(f"| {r['kind']} | {r['params'] / 1e9:.2f} B | {r['step_s_median']:.2f} | "
                     f"{cell(r, 'attack_s_median', '.2f')} | {cell(r, 'attacked_share', '.2f')} | "
                     f"{r['start_memory_gib']:.1f} | {cell(r, 'peak_memory_gib', '.1f')} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
