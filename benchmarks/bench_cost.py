"""How PGD's cost grows: time and peak memory vs image size, batch size and PGD steps.

Each configuration runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
Model: the tiny Qwen2-VL (untrained weights; cost does not depend on them), nothink answer loss,
L-inf PGD. Writes benchmarks/out/cost.json and cost.md.

    .venv/bin/python benchmarks/bench_cost.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from safemed_lib import attacks, data, models, prompts
size, batch, steps = map(int, sys.argv[1:4])
opts = ["CT", "MRI", "X-Ray", "OCT"]
items = [data.VQAItem(question_id=f"q{i}", dataset="bench", image_path=__import__("pathlib").Path("/x.png"),
                      question="Which modality is this?", options=opts, answer="ABCD"[i % 4], modality="CT",
                      question_type="Modality Recognition") for i in range(batch)]
corpus = [prompts.build_prompt(it, m) for it in items for m in prompts.MODES]
vlm = models.build_tiny_vlm(corpus, seed=0, image_size=size)
x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
loss_fn = attacks.vlm_answer_loss(vlm, items, prompt="nothink")
loss_fn(x.clone().requires_grad_()).sum().backward()  # warm-up
t0 = time.perf_counter()
xr = x.clone().requires_grad_()
loss_fn(xr).sum().backward()
fb = time.perf_counter() - t0
t0 = time.perf_counter()
attacks.pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=steps, generator=torch.Generator().manual_seed(0))
t = time.perf_counter() - t0
print(json.dumps(dict(image_size=size, batch=batch, steps=steps, image_tokens=(size // 28) ** 2,
                      pgd_s=t, pgd_s_per_image=t / batch, fwd_bwd_s=fb, ratio_to_floor=t / (steps * fb),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def run(size: int, batch: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(batch), str(steps)], check=True,
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                               "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    args = ap.parse_args()
    sizes = (112, 224) if args.quick else (112, 168, 224, 308, 392)
    batches = (1, 8) if args.quick else (1, 4, 8, 16)
    steps = (5, 10) if args.quick else (1, 5, 10, 20)
    configs = ([(s, 4, 10) for s in sizes] + [(112, b, 10) for b in batches if b != 4]
               + [(112, 4, k) for k in steps if k != 10])
    rows = []
    for cfg in configs:
        rows.append(run(*cfg))
        r = rows[-1]
        print(f"size {r['image_size']:3d} batch {r['batch']:2d} steps {r['steps']:2d}: "
              f"{r['pgd_s_per_image'] * 1000:8.1f} ms/image, {r['peak_rss_mb']:.0f} MB peak", flush=True)
    meta = dict(machine=platform.platform(), python=platform.python_version(), threads=1,
                when=time.strftime("%Y-%m-%d %H:%M:%S"), torch=__import__("torch").__version__)
    OUT.mkdir(exist_ok=True)
    (OUT / "cost.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| image | image tokens | batch | PGD steps | PGD ms/image | PGD / (steps x fwd+bwd) | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['image_size']} | {r['image_tokens']} | {r['batch']} | {r['steps']} | "
              f"{r['pgd_s_per_image'] * 1000:.1f} | {r['ratio_to_floor']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    (OUT / "cost.md").write_text("\n".join(lines) + f"\n\n{meta}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
