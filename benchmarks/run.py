"""Run every benchmark script and gather their Markdown into benchmarks/out/SUMMARY.md.

    .venv/bin/python benchmarks/run.py [--quick] [--only pgd certify ...]

Each script writes its own JSON + Markdown under benchmarks/out/; SUMMARY.md gathers every script's
latest Markdown (with --only, the others' from their last run) and adds the end-to-end
`make reproduce` wall time per notebook (from runs/<profile>/summary.json, the last full run;
a `--only` run writes summary-partial.json instead).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SCRIPTS = {  # name -> (script, args, args with --quick, its Markdown output)
    "pgd": ("bench_pgd.py", [], ["--repeats", "3"], "bench_pgd.md"),
    "certify": ("bench_certify.py", [], ["--repeats", "1"], "bench_certify.md"),
    "train": ("bench_train.py", [], ["--steps", "3"], "bench_train.md"),
    "sft": ("bench_sft.py", ["--no-cache"], ["--steps", "40"], "bench_sft.md"),
    "cost": ("bench_cost.py", [], ["--quick"], "cost.md"),
    "opt": ("bench_opt.py", [], ["--repeats", "3"], "bench_opt.md"),
    "data": ("bench_data.py", [], ["--n", "200"], "bench_data.md"),
    "gpu": ("gpu_check.py", [], [], "gpu_check.md"),
}


def end_to_end(profile: str = "tiny") -> str:
    summary = HERE.parent / "runs" / profile / "summary.json"
    if not summary.exists():
        return f"no `make reproduce` run of profile {profile} found (runs/{profile}/summary.json)\n"
    s = json.loads(summary.read_text())
    rows = [f"| {n['notebook']} | {n['status']} | {n['seconds'] / 60:.1f} |" for n in s["notebooks"]]
    when = f", finished {s['finished']}" if "finished" in s else ""
    return "\n".join([f"`make reproduce` ({profile}, the last full run{when}): {s['wall_seconds'] / 60:.1f} min in all", "",
                      "| notebook | status | minutes |", "| --- | --- | --- |", *rows]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=sorted(SCRIPTS))
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    parts, failed = [f"# Benchmarks ({time.strftime('%Y-%m-%d %H:%M')})", ""], []
    for name in args.only or SCRIPTS:
        script, extra, quick, md = SCRIPTS[name]
        print(f"== {script}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *extra, *(quick if args.quick else [])])
        if rc != 0:
            failed.append(script)
    for name, (script, _, _, md) in SCRIPTS.items():  # every script's latest output, run now or before
        parts += [f"## {name}", "", (OUT / md).read_text() if (OUT / md).exists() else f"({script} wrote no {md})", ""]
    parts += ["## end to end", "", end_to_end()]
    (OUT / "SUMMARY.md").write_text("\n".join(parts))
    print(f"wrote {OUT / 'SUMMARY.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
