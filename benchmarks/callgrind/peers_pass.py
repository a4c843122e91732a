"""One peers-suite pass under callgrind, counting only the pass (benchmarks/callgrind/run.sh).

usage: peers_pass.py RUNNER(gradguide|diffusers|model-only) SIZE(sd-b1|...) GUIDANCE(none|cfg) STEPS PASSES [MODEL=cheap|unet]
The marker library (cgmark.c, built by run.sh) switches callgrind's instrumentation on after two
warm-up passes and off after the timed ones, so imports and warm-up are not counted.
"""
import ctypes
import os
import sys

import torch

from gradguide.bench.peers import Workload

torch.set_num_threads(1)
runner, size, guidance, steps, passes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = sys.argv[6] if len(sys.argv) > 6 else "cheap"
mark = ctypes.CDLL(os.environ["CGMARK_LIB"])
w = Workload(model, size, guidance == "cfg", False, 0)
w.steps = steps
fn = {"gradguide": w.gradguide_runner(), "diffusers": w.diffusers_pass, "model-only": w.model_only_pass}[runner]
fn()
fn()
mark.cg_start()
for _ in range(passes):
    fn()
mark.cg_stop()
