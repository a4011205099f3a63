"""The "standard fine-tuned" baselines (notebook 02): SFT-think and SFT-nothink trained and scored clean.

    models = baseline.train(cfg)             # {"think": VLM, "nothink": VLM}, trained through the zoo
    results = baseline.evaluate_all(cfg, models)
"""
from __future__ import annotations

import pandas as pd

from .. import dataset, evaluate, sft, zoo
from ..workbook import background


def variants(cfg) -> list[str]:
    """Both SFT variants on the embedded benchmark; answer-only on OmniMedVQA (it has no rationales)."""
    return ["think", "nothink"] if cfg.data.omnimedvqa_root is None else ["nothink"]


def train(cfg) -> dict:
    """``{variant: VLM}``: each SFT model from the zoo, trained if missing. With ``sft.workers > 1``
    up to that many variants train at a time, one process each (the base is built here first, so
    both start from the same weights)."""
    names = [f"sft-{v}" for v in variants(cfg)]
    if cfg.sft.workers > 1 and len(names) > 1:
        zoo.ensure("base", cfg)
        for i in range(0, len(names), cfg.sft.workers):
            jobs = [background(zoo.ensure, n, cfg, threads=cfg.threads) for n in names[i:i + cfg.sft.workers]]
            for job in jobs:
                job.result()  # re-raises a worker's error here
    return {v: zoo.load(f"sft-{v}", cfg) for v in variants(cfg)}


def training_table(cfg) -> pd.DataFrame:
    """Steps, batch size, learning rate and training seconds of each SFT model."""
    rows = []
    for v in variants(cfg):
        run = sft.read_run(zoo.run_dir(f"sft-{v}", cfg) / "train")
        rows.append({"model": f"SFT-{v}", "steps": run["steps"], "batch size": run["batch_size"], "lr": run["lr"],
                     "training seconds": run["seconds"]})
    return pd.DataFrame(rows).set_index("model")


def _run(cfg, name: str, load, items, prompt: str, method: str) -> pd.DataFrame:
    e = cfg.eval
    return evaluate.cached(load, items, zoo.run_dir(name, cfg) / f"eval-clean-{prompt}-{method}",
                           model_key=zoo.fingerprint(name, cfg), prompt=prompt, image_size=cfg.data.image_size,
                           method=method, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, desc=name)


def evaluate_all(cfg, models: dict) -> dict[str, pd.DataFrame]:
    """Clean results on the evaluated test questions (``eval.n``): the untrained base (generation
    and the option-letter log-probs), each SFT model in its own prompt form, and SFT-nothink read
    through the log-probs too."""
    _, test = dataset.splits(cfg)
    items = evaluate.subset(test, cfg.eval.n, seed=cfg.seed)
    base = lambda: zoo.load("base", cfg)  # noqa: E731
    results = {"untrained": _run(cfg, "base", base, items, "nothink", "generate"),
               "untrained (logprob)": _run(cfg, "base", base, items, "nothink", "logprob")}
    for v, vlm in models.items():
        results[f"SFT-{v}"] = _run(cfg, f"sft-{v}", lambda vlm=vlm: vlm, items, v, "generate")
    if "nothink" in models:
        results["SFT-nothink (logprob)"] = _run(cfg, "sft-nothink", lambda: models["nothink"], items, "nothink",
                                                "logprob")
    return results


def loss_figure(cfg):
    """SFT training loss (mean NLL per target token) against step, one line per variant."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for v in variants(cfg):
        log = sft.read_log(zoo.run_dir(f"sft-{v}", cfg) / "train")
        ax.plot(log["step"], log["loss"], label=f"SFT-{v}")
    ax.set(xlabel="step", ylabel="mean NLL per target token", yscale="log", title="SFT training loss")
    ax.legend()
    fig.tight_layout()
    return fig
