"""The ``gradguide`` command line: ``gradguide demo | info`` (more subcommands per module).

Each subcommand is registered by a ``register(subparsers)`` function next to the code it
runs, so this file only wires them together.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default example and print a table")
    p.add_argument("--example", choices=["mixture"], default="mixture",
                   help="which example: 'mixture' (every guidance method on an exact Gaussian mixture)")
    p.add_argument("--n", type=int, default=2000, help="samples per method (default 2000)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (default 100)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpmpp-2m"], help="sampler (default ddpm)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--plot", default="gradguide-demo.png", help="scatter plot path (default gradguide-demo.png)")
    p.add_argument("--json", default=None, help="also write the table as JSON to this path")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from . import demo_mixture
    if args.n < 1 or args.steps < 1:
        raise SystemExit("gradguide demo: --n and --steps must be positive")
    demo_mixture.run(n=args.n, steps=args.steps, sampler=args.sampler, seed=args.seed, plot=args.plot,
                     json_path=args.json)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradguide", description="Fast guided sampling for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_demo(sub)
    _register_info(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
