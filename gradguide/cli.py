"""The ``gradguide`` command line: ``gradguide demo | info`` (more subcommands per module).

Each subcommand is registered by a ``register(subparsers)`` function next to the code it
runs, so this file only wires them together. The rules every subcommand follows (where files
go, ``--force``, one-line errors, progress bars) are in :data:`RULES`, printed by ``--help``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .tools import outputs

DEBUG_ENV = "GRADGUIDE_DEBUG"

RULES = """\
outputs: every command writes under the working directory (or --out / --json / --plot ...), never
into the installed gradguide package (its shipped weights are only read), and never over an
existing file: it refuses before running, naming the file, unless given --force. `sample` and
`sweep-digits` resume into their own run folder (finished files are kept, not rewritten).
errors: a user error or a missing optional dependency is one line (the latter names the extra:
pip install "gradguide[diffusers]", "gradguide[digits]", ...) and a non-zero exit; --debug shows
the traceback. progress bars go to stderr only when it is a terminal; --no-progress turns them off.
"""

# subcommands that write files: they take --force (see RULES)
WRITES_FILES = ("demo", "optimize", "train-sim", "bench", "train-digits", "evaluate", "sweep-digits", "profile",
                "dryrun", "check-kernels")


def _sampler_names():
    from .samplers import SAMPLERS   # every sampler is a LinComb step: each one works with every guidance
    # but dpm_fast, which takes its range as sigmas=[σ_max, σ_min] and an nfe, not the demo's step count, and
    # SA-Solver, whose noise window (sde_sigmas) is an option the demo does not take
    return sorted(s for s in SAMPLERS if s not in ("dpm_fast", "sa_solver", "sa_solver_pece"))


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default example and print a table")
    p.add_argument("--example", choices=["optimize", "mixture"], default="optimize",
                   help="which example: 'optimize' (default: Algorithms 1 and 2 with G and G_loss on the "
                        "subspace simulation, f1/theta2) or 'mixture' (every guidance method on an exact "
                        "Gaussian mixture)")
    p.add_argument("--n", type=int, default=2000, help="mixture: samples per method (default 2000)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 50 for optimize, 200 with --full; 100 for mixture)")
    p.add_argument("--sampler", default="ddpm", choices=_sampler_names(), help="sampler (default ddpm)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 1234 for optimize, 0 for mixture)")
    p.add_argument("--plot", default=None,
                   help="plot path (default gradguide-demo-optimize.png / gradguide-demo.png)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--full", action="store_true",
                   help="optimize: the paper's settings (1000/1200 rounds, 200 steps, k_ft 40/60; long on CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="optimize: rounds of Algorithm 1 (Algorithm 2 runs 1.2x; default 100, --full 1000)")
    p.add_argument("--ft-lr", type=float, default=None,
                   help="optimize: fine-tuning lr (default 1e-4 for the demo, 1e-5 with --full)")
    p.add_argument("--no-progress", action="store_true", help="optimize: no progress bar")
    p.set_defaults(func=_demo)


def _claim_demo_outputs(args) -> None:
    """The demo's plot (default name per example) and JSON: checked before it runs."""
    if args.plot is None:
        args.plot = "gradguide-demo-optimize.png" if args.example == "optimize" else "gradguide-demo.png"
    outputs.claim(args.plot, option="--plot")
    if args.json:
        outputs.claim(args.json, option="--json")


def _demo(args) -> int:
    if args.example == "optimize":
        from .experiments import demo_optimize
        return demo_optimize.run_cli(args, before=_claim_demo_outputs)
    from .experiments import demo_mixture
    steps = 100 if args.steps is None else args.steps
    if args.n < 1 or steps < 1:
        raise SystemExit("gradguide demo: --n and --steps must be positive")
    _claim_demo_outputs(args)
    demo_mixture.run(n=args.n, steps=steps, sampler=args.sampler, seed=0 if args.seed is None else args.seed,
                     plot=args.plot, json_path=args.json)
    return 0


def _register_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="generative optimisation: Algorithms 1 and 2 on the subspace simulation")
    from .experiments.optimize import add_arguments
    add_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.experiments.optimize", fromlist=["run_cli"]).run_cli(args))


def _register_train_sim(sub) -> None:
    p = sub.add_parser("train-sim", help="retrain the shipped small score network of the simulation (deterministic)")
    from .experiments.simulation import add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.experiments.simulation", fromlist=["run_train"]).run_train(args))


def _register_info(sub) -> None:
    p = sub.add_parser("info", help="print versions and the compute backends this installation has")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import torch

    import gradguide
    from gradguide import ops
    print(f"gradguide {gradguide.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, status in ops.available_backends().items():
        print(f"  backend {name:9s}: {'available' if status is True else status}")
    return 0


def _register_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw N samples into .npz shards + a manifest (resumable; torchrun-aware)",
                       description="Sharded, resumable sampling; launch under torchrun for several processes/GPUs. "
                                   "Samples depend only on --seed and their index, not on the process count.")
    p.add_argument("--model", default="mixture",
                   help="'mixture' (2-D Gaussian mixture), 'subspace' (64-D subspace Gaussian) or 'module:function' "
                        "returning a model, (model, schedule) or a dict (see docs/sampling-at-scale.md)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, required=True,
                   help="number of samples (under torchrun write --num-samples: torchrun's parser reads --n as "
                        "an ambiguous abbreviation of its own options)")
    p.add_argument("--out", required=True, help="output directory (shards, samples.npz, manifest.json)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i uses sample_seed(seed, i) (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default 1000)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per model call (default 500)")
    p.add_argument("--sampler", default="ddpm", choices=_sampler_names(), help="sampler (default ddpm)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (default 100)")
    p.add_argument("--spacing", default="adm", choices=["adm", "leading", "trailing", "linspace"],
                   help="timestep spacing (default adm; a diffusers schedule uses its own)")
    p.add_argument("--eta", type=float, default=None,
                   help="the sampler's eta: DDIM, ancestral and SDE samplers (default: the sampler's own, 0 for DDIM, "
                        "1 for the ancestral and SDE samplers)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale w (diffusers convention)")
    p.add_argument("--classifier-scale", type=float, default=None, help="classifier guidance scale s")
    p.add_argument("--projection", choices=["A", "B", "C"], default=None, help="PixelAsParam policy")
    p.add_argument("--class-label", type=int, default=None, help="target class of the mixture (default 2)")
    p.add_argument("--conditional", action="store_true", help="use the class-conditional mixture model")
    p.add_argument("--shape", default=None, help="one sample's shape for user models, e.g. 3,32,32")
    p.add_argument("--clip", default="auto", help="clip x0 to [-r, r]: 'auto' (the model's default), 'none' or r")
    p.add_argument("--backend", default="auto", help="ops backend (default auto)")
    p.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK when available, else cpu), 'cpu', 'cuda'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="log from every rank, not only rank 0")
    p.add_argument("--wait-lock", action="store_true",
                   help="if another run holds --out, wait for it to finish (default: refuse with an error naming "
                        "its pid and host)")
    p.set_defaults(func=_sample)


def _sample(args) -> int:
    from .tools import sharded
    if outputs.inside_package(args.out):   # a resumable folder: only the package rule applies
        outputs.claim(args.out)
    return sharded.main(args)


def _register_digits(sub) -> None:
    # PixelAsParam on the 8x8 digits (scikit-learn is imported only when a digits command runs)
    p = sub.add_parser("train-digits", help="retrain the shipped 8x8-digits models (deterministic, one thread)")
    from .experiments.digits.train import add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.experiments.digits.train", fromlist=["run_train"]).run_train(args))
    p = sub.add_parser("evaluate", help="accuracy, classifier-FID, precision/recall of 8x8 digit samples "
                                        "against the held-out digits (docs/mathematics.md#evaluation)")
    from .experiments.evaluation import add_arguments as add_eval_arguments
    add_eval_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.experiments.evaluation", fromlist=["run_cli"]).run_cli(args))
    p = sub.add_parser("sweep-digits", help="guidance sweeps on the digits: baseline vs PixelAsParam, "
                                            "policies A/B/C, DDPM and DDIM, with plots")
    from .experiments.digits.sweep import add_arguments as add_sweep_arguments
    add_sweep_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.experiments.digits.sweep", fromlist=["run_cli"]).run_cli(args))


def _register_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the compute backends (writes JSON + markdown)")
    p.add_argument("--suite", choices=["ops", "loop", "paper", "peers", "gpu", "precision", "native-bandwidth"],
                   default="ops",
                   help="'ops': reduce + combine of each built-in policy on every backend, side by side; "
                        "'loop': whole sampling passes with a cheap model (the loop's own cost); 'paper': the "
                        "papers' workloads (simulation pass, SD-1.5 + VAE + G_loss, ADM + classifier + PixelAsParam), "
                        "each eager / fused / fused+graph / torch.compile; 'peers': gradguide vs the plain "
                        "diffusers DDIM loop, side by side (cheap model and tiny SD U-Net, unguided and CFG 7.5), and "
                        "the SD3 flow-Euler loop (cheap model and tiny SD3 transformer, CFG 7.0; see "
                        "gradguide/bench/peers.py, peers_flow.py); 'gpu': the GPU acceptance run (bandwidth sweep, "
                        "graph-vs-eager equality and speed, paper workloads, NVML memory) in one report (needs a "
                        "CUDA device; see docs/performance.md); 'precision': float32 vs float64 on the pinned precision cases, "
                        "every backend (gradguide/bench/precision.py); 'native-bandwidth': the native CPU ops against "
                        "the machine's copy bandwidth (gradguide/bench/native_bandwidth.py; --threads default 2)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="gpu suite: run its plumbing on the CPU (a test hook; the report is labelled and its numbers "
                        "are not GPU measurements; default: refuse without a CUDA device)")
    p.add_argument("--quick", action="store_true", help="small sizes only (seconds; for CI and tests)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="operand dtype (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of reference,compile,native,triton (default: all available)")
    p.add_argument("--note", default="", help="a line added to the markdown (e.g. 'shared 2-core CPU')")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (bars are off anyway when stderr is not a terminal)")
    _register_bench_loop(p)
    p.set_defaults(func=_bench)


def _register_bench_loop(p) -> None:
    # options of --suite loop|paper (gradguide/bench/loop.py, imported lazily like bench/ops.py)
    p.add_argument("--workloads", default=None,
                   help="loop/paper: comma-separated workloads (default: the suite's; see gradguide/bench/loop.py); "
                        "peers: models, some of cheap,unet,flow-cheap,flow-sd3 (default all)")
    p.add_argument("--sizes", default=None,
                   help="peers: comma-separated sizes, some of sd-b1,sd-b4,sd-b8,px-b16 and, for the flow models, "
                        "sd3-b1,sd3-b4 (default all; --quick: sd-b1,px-b3,sd3-b1); each model runs those of its own "
                        "table; native-bandwidth: some of adm256-b64,sd-b1 (default both; --quick: sd-b1)")
    p.add_argument("--variants", default=None,
                   help="loop/paper: comma-separated subset of eager,fused,fused+graph,compile "
                        "(default: all; --quick: eager,fused,fused+graph)")
    p.add_argument("--reps", type=int, default=None,
                   help="loop/paper: timed passes per row (default 5; --quick 1); peers: timed passes per runner "
                        "(default: 3 s worth, 5 to 40; 2 for the U-Net at B >= 8); native-bandwidth: timed rounds (default 9; "
                        "--quick 2)")
    p.add_argument("--seed", type=int, default=0, help="loop/paper: seed of weights, inputs and noise (default 0)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="loop/paper: SD/ADM network weights (default float16 on CUDA, float32 on CPU)")


def _bench(args) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("gradguide bench: --threads must be positive")
        torch.set_num_threads(args.threads)
    if args.suite == "gpu":
        from .bench.gpu import run_cli
        return run_cli(args)
    if args.suite == "peers":
        from .bench import peers
        return peers.run_cli(args)
    if args.suite in ("loop", "paper"):
        from .bench import loop
        return loop.run_cli(args)
    if args.suite == "precision":
        from .bench import precision
        return precision.run_cli(args)
    if args.suite == "native-bandwidth":
        from .bench import native_bandwidth
        return native_bandwidth.run_cli(args)
    from .bench import ops as bench
    backends = args.backends.split(",") if args.backends else None
    unknown = set(backends or ()) - {"reference", "compile", "native", "triton"}
    if unknown:
        raise SystemExit(f"gradguide bench: --backends: unknown {sorted(unknown)}; "
                         "expected reference, compile, native, triton")
    from .bench import meta
    meta.claim_report(args.out, bench.stem("ops", meta.device_type(args.device), args.quick, meta.today()))
    result = bench.run(quick=args.quick, device=args.device, dtype=getattr(torch, args.dtype), backends=backends,
                       progress=not args.no_progress)
    status = meta.print_report(bench.write(result, args.out, note=args.note), bench.markdown(result, args.note))
    meta.warn_unstable("gradguide bench", result["unstable_rows"], result["timed_rows"])
    return status


def _register_profile(sub) -> None:
    p = sub.add_parser("profile", help="peak memory per phase (forward, backward, guidance, graph pool) of a "
                                       "sampling run, a memory-over-time plot, an optional torch.profiler trace")
    from .bench.profile import add_arguments
    add_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.bench.profile", fromlist=["run_cli"]).run_cli(args))


def _register_dryrun(sub) -> None:
    p = sub.add_parser("dryrun", help="run guided steps on fake CUDA tensors (no GPU): device/sync/trace checks, "
                                      "launches, bytes vs minimum, projected GPU memory and time")
    from .bench.dryrun import add_arguments
    add_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.bench.dryrun", fromlist=["run_cli"]).run_cli(args))


def _register_check_kernels(sub) -> None:
    p = sub.add_parser("check-kernels", help="compile every Triton kernel variant (and csrc/*.cu with nvcc) for "
                                             "sm_80/sm_90 without a GPU; check registers, spills, load widths")
    from .bench.compile_gates import add_arguments
    add_arguments(p)
    p.set_defaults(func=lambda args: __import__("gradguide.bench.compile_gates", fromlist=["run_cli"]).run_cli(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradguide", description="Fast guided sampling for diffusion models.",
                                     epilog=RULES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_demo(sub)
    _register_optimize(sub)
    _register_train_sim(sub)
    _register_info(sub)
    _register_bench(sub)
    _register_sample(sub)
    _register_digits(sub)
    _register_profile(sub)
    _register_dryrun(sub)
    _register_check_kernels(sub)
    for name in WRITES_FILES:
        p = sub.choices[name]
        p.add_argument("--force", action="store_true",
                       help="overwrite existing output files (default: refuse, naming the file; never writes into "
                            "the installed package)")
        p.epilog, p.formatter_class = RULES, argparse.RawDescriptionHelpFormatter
    return parser


def error_line(exc: BaseException) -> str:
    """One line for a user error: the message (it names the argument), or for an OS error its
    reason and the path."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        for name in (exc.filename, exc.filename2):
            if name is not None and str(name) not in text:
                text += f": {name}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    from .tools import extras
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with outputs.guard(force=getattr(args, "force", False)):
            return args.func(args)
    except ImportError as exc:   # a missing optional dependency: one line naming the extra
        line = extras.describe(exc)
        if debug or line is None:
            raise
        raise SystemExit(f"gradguide {args.command}: error: {line}") from None
    except (ValueError, TypeError, OSError) as exc:  # user errors (bad input, unwritable output): one line
        if debug:
            raise
        raise SystemExit(f"gradguide {args.command}: error: {error_line(exc)} "
                         f"(--debug or {DEBUG_ENV}=1 for the traceback)") from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(f"gradguide {args.command}: interrupted") from None


if __name__ == "__main__":
    sys.exit(main())
