"""The summary: each paper's headline claims, the paper's number, ours, and whether the direction holds.

Notebooks record what they measured with :func:`record_claim` (one small JSON file per claim under
``results/claims/``); the last notebook calls :func:`write_report` to assemble ``results/REPORT.md``.
A claim no notebook measured on this run is listed as "not measured", never filled in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .paths import PROJECT_ROOT, RESULTS
from .records import atomic_write_text


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    claim: str
    paper_number: str
    figure: str = ""  # a figure under figures/ that shows it


CLAIMS = (
    Claim("safemed.sft_collapse", "SafeMed-R1", "A standard fine-tuned VLM collapses under PGD",
          "~95% clean -> ~25% under PGD", "figures/03_eps_sweep.png"),
    Claim("safemed.atgrpo_robust", "SafeMed-R1", "AT-GRPO keeps most of its accuracy under the same PGD",
          "84.45% under PGD (+59 points over standard fine-tuning)", "figures/05_clean_vs_pgd.png"),
    Claim("safemed.cot_more_robust", "SafeMed-R1",
          "Chain-of-thought (think) models are more robust under attack than answer-only models",
          "qualitative (no table public)", "figures/05_clean_vs_pgd.png"),
    Claim("safemed.smoothing_certifies", "SafeMed-R1",
          "Randomized smoothing certifies the VLM's answer: the best model at least 60% certified at L2 0.25 "
          "and 40% at 0.5 (100 items, n >= 1,000; Cohen et al.'s CIFAR-10 figures)",
          "certified radius reported; no numbers public", "figures/06_certified_accuracy.png"),
    Claim("medr1.cross_modality_gain", "Med-R1",
          "GRPO improves average accuracy over the base model across modalities (8x8 protocol)",
          "+29.94 points", "figures/04_generalization_modality.png"),
    Claim("medr1.cross_qtype_gain", "Med-R1",
          "GRPO improves over the base model in question-type generalization (5x5 protocol)",
          "+32.06 points", "figures/04_generalization_qtype.png"),
    Claim("medr2.stage_degradation", "Med-R2", "Accuracy degrades stage by stage along the clinical workflow",
          "qualitative (numbers not public)", "figures/07_stage_degradation.png"),
    Claim("medr2.misleading_cues", "Med-R2", "Misleading textual cues flip answers (models rely on prompts)",
          "qualitative (numbers not public)", "figures/07_cue_flip_rates.png"),
    Claim("medr2.visual_cues", "Med-R2", "Even with explicit visual cues models struggle to use the image",
          "qualitative (numbers not public)", "figures/07_cue_example.png"),
    Claim("medr2.stepwise_ft", "Med-R2", "Stepwise fine-tuning on the hierarchical data improves robustness",
          "qualitative (numbers not public)", "figures/07_stepwise_vs_plain.png"),
)
_BY_ID = {c.id: c for c in CLAIMS}


READS_IMAGE_MARGIN = 10.0  # points above chance: a model below it says nothing about a claim
MATERIAL_GAIN = 10.0  # points: the gain a paper's claim of a large improvement needs on our runs


def reads_image(accuracy: float, chance: float, margin: float = READS_IMAGE_MARGIN) -> bool:
    """Whether a model's accuracy (%) is more than ``margin`` points above ``chance`` (%): one
    that is not does not read the image, so a claim resting on it cannot be judged."""
    return accuracy > chance + margin


def claims_dir(results: Path = RESULTS) -> Path:
    return Path(results) / "claims"


def record_claim(claim_id: str, ours: str, holds: bool | None, *, profile: str, detail: str = "",
                 results: Path = RESULTS) -> Path:
    """Store what this run measured for one claim. ``holds`` is whether the claim's direction holds
    on our run (None: cannot tell). ``ours`` is the measured number(s) as text."""
    if claim_id not in _BY_ID:
        raise ValueError(f"unknown claim {claim_id!r}; known: {', '.join(_BY_ID)}")
    rec = {"id": claim_id, "ours": str(ours), "holds": holds, "profile": profile, "detail": detail}
    return atomic_write_text(claims_dir(results) / f"{claim_id}.json", json.dumps(rec, indent=2))


def load_claims(results: Path = RESULTS) -> dict[str, dict]:
    out = {}
    for p in sorted(claims_dir(results).glob("*.json")):
        rec = json.loads(p.read_text())
        out[rec["id"]] = rec
    return out


VERDICT = {True: "yes", False: "**no**", None: "unclear"}


def claims_table(results: Path = RESULTS, profile: str | None = None, figures: str = "../") -> list[str]:
    """The claims as Markdown table lines (``figures``: the figures folder's prefix, relative to the file)."""
    measured = load_claims(results)
    lines = ["| paper | claim | paper's number | ours | direction holds | figure |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in CLAIMS:
        m = measured.get(c.id)
        if m is None:
            ours, holds = "not measured on this run", "-"
        else:
            ours = m["ours"] + ("" if profile in (None, m["profile"]) else f" (profile {m['profile']})")
            holds = VERDICT[m["holds"]]
        fig = f"[{Path(c.figure).name}]({figures}{c.figure})" if c.figure else ""
        lines.append(f"| {c.paper} | {c.claim} | {c.paper_number} | {ours} | {holds} | {fig} |")
    return lines


def verdicts(ids: list[str], results: Path = RESULTS):
    """The recorded verdicts of the claims ``ids`` as a table (a notebook's closing cell)."""
    import pandas as pd

    measured = load_claims(results)
    return pd.DataFrame([{"claim": _BY_ID[i].claim, "paper": _BY_ID[i].paper_number,
                          "ours": measured[i]["ours"] if i in measured else "not measured",
                          "direction holds": VERDICT[measured[i]["holds"]] if i in measured else "-"}
                         for i in ids]).set_index("claim")


def report_markdown(results: Path = RESULTS, profile: str | None = None) -> str:
    measured = load_claims(results)
    lines = ["# SafeMed workbook: headline claims, the papers' numbers and ours", ""]
    if profile:
        lines += [f"Profile of this run: `{profile}`. Numbers of other profiles are not mixed in: a claim measured "
                  "under another profile is marked so.", ""]
    lines += claims_table(results, profile)
    details = [(c, measured[c.id]["detail"]) for c in CLAIMS if c.id in measured and measured[c.id]["detail"]]
    if details:
        lines += ["", "## Notes", ""] + [f"- **{c.id}**: {d}" for c, d in details]
    lines += ["", "The embedded default is a synthetic benchmark and a tiny model trained here: directions, not "
              "magnitudes, are what it can confirm. See docs/results.md for its limits."]
    return "\n".join(lines) + "\n"


def write_report(results: Path = RESULTS, profile: str | None = None) -> Path:
    return atomic_write_text(Path(results) / "REPORT.md", report_markdown(results, profile))


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def update_readme(results: Path = RESULTS, profile: str | None = None, readme: Path = PROJECT_ROOT / "README.md"
                  ) -> bool:
    """Put the claims table between the README's results markers (only for the project's own
    ``results/``: a test run with ``SAFEMED_OUTPUT_DIR`` leaves the README alone). Returns whether
    it wrote."""
    if Path(results).resolve() != (PROJECT_ROOT / "results").resolve() or not Path(readme).is_file():
        return False
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} markers for the results table")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    table = "\n".join([f"Profile `{profile}`, from `results/claims/` (regenerated by notebook 09)." if profile else "",
                       "", *claims_table(results, profile, figures="")])
    atomic_write_text(readme, f"{head}{README_BEGIN}\n{table.strip()}\n{README_END}{tail}")
    return True
