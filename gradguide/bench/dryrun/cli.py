"""``gradguide dryrun``: its arguments and its run (see :mod:`gradguide.bench.dryrun`)."""
from __future__ import annotations

import json

from gradguide import ops

from .report import PAPER, build_report, markdown, stem, write, write_docs
from .workloads import _load_bench


def add_arguments(p) -> None:
    p.add_argument("--workload", default=None,
                   help=f"comma-separated workloads of the bench harness, or 'none' (default: {','.join(PAPER)}; "
                        "without diffusers installed, those that need it are skipped with a notice)")
    p.add_argument("--no-combinations", action="store_true",
                   help="skip the sampler x guidance x projection sweep (default: run it)")
    p.add_argument("--quick", action="store_true", help="the workloads' tiny configurations (seconds; for CI)")
    p.add_argument("--backend", default="auto",
                   help="ops backend: auto (default: triton if its ops trace on fake tensors, else native, "
                        "else reference), triton, native or reference")
    p.add_argument("--out", default="benchmarks/results", help="folder for dryrun-*.json/.md (default benchmarks/results)")
    p.add_argument("--write-docs", action="store_true",
                   help="also regenerate the projection table in docs/performance.md (this option is the permission "
                        "to rewrite that file's generated block; the rest of the file is kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", default=None,
                   help="re-render a saved report (dryrun-*.json: rewrites the .md next to it; with --write-docs "
                        "also the docs) instead of running")


def default_workloads(log=None) -> tuple:
    """``(workloads, skipped)``: :data:`PAPER`, less those that need diffusers where it does not
    import (``skipped``: name -> reason; ``log`` gets one line naming them)."""
    from gradguide.tools import extras
    bench = _load_bench()
    why = extras.unavailable("diffusers") if any(bench.needs_diffusers(w) for w in PAPER) else None
    if why is None:
        return list(PAPER), {}
    skipped = {w: f"it builds diffusers modules, and {why}" for w in PAPER if bench.needs_diffusers(w)}
    if log is not None:
        log(f"gradguide dryrun: skipping {', '.join(skipped)} (they build diffusers modules): {why}")
    return [w for w in PAPER if w not in skipped], skipped


def run_cli(args) -> int:
    import sys

    from gradguide.bench import meta
    from gradguide.tools import outputs
    if args.backend not in ops.BACKENDS:
        raise SystemExit(f"gradguide dryrun: --backend: expected one of {ops.BACKENDS}, got {args.backend!r}")
    bench = _load_bench()
    skipped = {}
    if args.workload is None:
        if args.from_json:
            workloads = []
        else:
            workloads, skipped = default_workloads(log=lambda line: print(line, file=sys.stderr))
    else:
        workloads = [] if args.workload == "none" else [w for w in args.workload.split(",") if w]
    unknown = [w for w in workloads if w not in bench.ALL_WORKLOADS]
    if unknown:
        raise SystemExit(f"gradguide dryrun: --workload: unknown {unknown}; expected some of "
                         f"{', '.join(bench.ALL_WORKLOADS)} or 'none'")
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        if args.from_json.endswith(".json"):   # the markdown next to it follows the current renderer
            outputs.claim(args.from_json[:-5] + ".md", option="--from-json")
            with open(args.from_json[:-5] + ".md", "w") as f:
                f.write(markdown(report))
        if args.write_docs:
            print(write_docs(report))
        print(markdown(report))
        return 0
    command = "gradguide " + " ".join(sys.argv[1:]) if sys.argv and "dryrun" in sys.argv else "gradguide dryrun"
    meta.claim_report(args.out, stem(args.quick, meta.today()))   # refused before the run, not after
    report = build_report(workloads, combinations=not args.no_combinations, quick=args.quick, backend=args.backend,
                          progress=not args.no_progress, command=command)
    report["skipped_workloads"] = skipped
    for path in write(report, args.out):
        print(path)
    if args.write_docs:
        print(write_docs(report))
    print(markdown(report))
    return 0
