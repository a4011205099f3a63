"""Run the workbook's notebooks in order through papermill with a profile.

    python -m safemed_lib.reproduce --profile tiny [--only 03 05] [--set key=value ...] [--keep-going]

Every notebook's ``parameters`` cell declares ``profile`` and ``overrides``; papermill injects the
profile (a name in ``configs/`` or a YAML path, see ``safemed_lib.config``) and the overrides
(``--set attack.eps=4 --set eval.n=50``: dotted keys, values read as YAML), which are validated
before any notebook runs (an unknown key is an error naming it). Executed notebooks go to
``runs/<profile>/``. A failing notebook is named with its failing cell; its partial output notebook
is kept; the run stops there (or goes on with ``--keep-going``) and exits non-zero.
``--prepare-only`` writes the parameterized notebooks without executing them (``make test`` hands
those to nbval).

Each run writes its timings to ``<out>/summary.json`` when it ran every notebook, and to
``<out>/summary-partial.json`` when ``--only`` picked some: a partial run never overwrites the
timings of the last full run (``benchmarks/run.py`` reports those).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config
from .paths import FIGURES, PROJECT_ROOT, RESULTS, RUNS, resolve

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def find_notebooks(folder: Path = NOTEBOOKS, only: list[str] | None = None) -> list[Path]:
    """Notebooks named ``NN_topic.ipynb``, in order; ``only`` keeps those whose number or name matches."""
    books = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = [str(o) for o in only]
        books = [b for b in books if any(b.name.startswith(w) or b.stem == w for w in wanted)]
        if not books:
            raise SystemExit(f"--only {' '.join(wanted)}: no notebook in {folder} matches")
    return books


def declared_parameters(notebook: Path) -> set[str]:
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)))


@dataclass
class Outcome:
    notebook: str
    status: str  # "ok" | "failed" | "prepared"
    seconds: float
    output: str
    error: str = ""
    parameters: dict = field(default_factory=dict)


def run_notebook(nb: Path, out: Path, params: dict, *, prepare_only: bool = False,
                 kernel: str = "python3", progress: bool = True) -> Outcome:
    import papermill as pm

    declared = declared_parameters(nb)
    given = {k: v for k, v in params.items() if k in declared}
    t0 = time.time()
    try:
        pm.execute_notebook(str(nb), str(out), parameters=given, kernel_name=kernel,
                            cwd=str(PROJECT_ROOT), prepare_only=prepare_only,
                            progress_bar=progress and not prepare_only, log_output=False)
    except pm.PapermillExecutionError as e:
        where = f"cell {e.exec_count}" if e.exec_count is not None else f"cell index {e.cell_index}"
        msg = f"{nb.name} failed at {where}: {e.ename}: {str(e.evalue).splitlines()[0] if e.evalue else ''}"
        return Outcome(nb.name, "failed", time.time() - t0, str(out), msg, given)
    except Exception as e:  # kernel died, bad notebook JSON, ...
        return Outcome(nb.name, "failed", time.time() - t0, str(out), f"{nb.name} failed: {type(e).__name__}: {e}", given)
    return Outcome(nb.name, "prepared" if prepare_only else "ok", time.time() - t0, str(out), "", given)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safemed_lib.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny", help="configs/<name>.yaml or a YAML path (default: tiny)")
    ap.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (number or name)")
    ap.add_argument("--set", "-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one configuration key, e.g. --set attack.eps=4 (repeatable)")
    ap.add_argument("--keep-going", action="store_true", help="go on after a failing notebook")
    ap.add_argument("--out", help="folder for executed notebooks (default: runs/<profile>)")
    ap.add_argument("--notebooks", default=str(NOTEBOOKS), help="folder of NN_*.ipynb notebooks")
    ap.add_argument("--prepare-only", action="store_true", help="inject parameters without executing")
    ap.add_argument("--kernel", default="python3")
    args = ap.parse_args(argv)

    try:
        overrides = config.parse_overrides(args.overrides)
        cfg = config.load(args.profile, overrides)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    profile = str(config.profile_path(args.profile)) if Path(str(args.profile)).suffix else cfg.profile
    params = {"profile": profile, "overrides": overrides}
    books = find_notebooks(Path(args.notebooks), args.only)
    if not books:
        print(f"no NN_*.ipynb notebooks in {args.notebooks}", file=sys.stderr)
        return 2
    out_dir = resolve(args.out or RUNS / cfg.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kernels inherit the environment: one torch thread unless the profile says otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    verb = "preparing" if args.prepare_only else "running"
    print(f"{verb} {len(books)} notebook(s) with profile {cfg.profile!r}"
          + (f" and overrides {overrides}" if overrides else "") + f" -> {out_dir}")
    t_all, outcomes = time.time(), []
    for i, nb in enumerate(books, 1):
        print(f"[{i}/{len(books)}] {nb.name}", flush=True)
        res = run_notebook(nb, out_dir / nb.name, params, prepare_only=args.prepare_only, kernel=args.kernel)
        outcomes.append(res)
        if res.status == "failed":
            print(f"  FAILED: {res.error}\n  partial output kept: {res.output}", flush=True)
            if not args.keep_going:
                break
        else:
            print(f"  {res.status} in {res.seconds:.1f} s", flush=True)
    wall = time.time() - t_all

    summary = {"profile": cfg.profile, "overrides": overrides, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "wall_seconds": round(wall, 1), "partial": bool(args.only),
               "notebooks": [o.__dict__ for o in outcomes]}
    summary_file = out_dir / ("summary-partial.json" if args.only else "summary.json")
    summary_file.write_text(json.dumps(summary, indent=2, default=str))
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = len(books) - len(outcomes)
    print("\n" + "\n".join(f"  {o.status:8s} {o.seconds:7.1f} s  {o.notebook}" for o in outcomes))
    if not args.prepare_only:
        print(f"\nexecuted notebooks: {out_dir}\nfigures: {FIGURES}\ntables: {RESULTS}")
        report = RESULTS / "REPORT.md"
        if report.exists() and not failed:
            print(f"\n{report}:\n{report.read_text()}")
    print(f"wall time: {wall / 60:.1f} min ({wall:.0f} s)")
    if failed:
        print(f"{len(failed)} notebook(s) failed" + (f", {skipped} not run" if skipped else "") + ":", file=sys.stderr)
        for o in failed:
            print(f"  {o.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
