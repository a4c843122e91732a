"""Instructions of sample()'s per-call setup alone: ``sampling.prepare_run`` as ``sample()`` calls it
(peers workload sd-b1, cheap model, sampler DDIM, 25 steps), counted by callgrind around 10 calls
after 2 warm-up calls (cgmark.c client requests; the warm-up fills the setup cache).

usage (from the repository root; divide the summary by 10):
    gcc -O2 -shared -fPIC -o /tmp/libcgmark.so benchmarks/callgrind/cgmark.c
    CGMARK_LIB=/tmp/libcgmark.so OMP_NUM_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \
        --collect-atstart=no --callgrind-out-file=/tmp/setup.out python benchmarks/callgrind/setup_pass.py cfg
    awk '/^summary:/ {print $2 / 10}' /tmp/setup.out.1
"""
import ctypes
import os
import sys

import torch

import gradguide
from gradguide import sampling
from gradguide.bench.peers import Workload, GUIDANCE_SCALE
from gradguide.integrations.diffusers import DiffusersSchedule
torch.set_num_threads(1)
cfg = sys.argv[1] == "cfg"   # cfg | none
mark = ctypes.CDLL(os.environ["CGMARK_LIB"])
w = Workload("cheap", "sd-b1", cfg, False, 0); w.steps = 25
schedule = DiffusersSchedule(w.scheduler)
guidance = gradguide.CFG(GUIDANCE_SCALE, uncond={"encoder_hidden_states": w.neg}) if cfg else ()
prep = lambda: sampling.prepare_run(w.model, w.shape, schedule=schedule, sampler="ddim", steps=w.steps, x_T=w.x_T,
                                    cond={"encoder_hidden_states": w.pos}, guidance=guidance)
prep(); prep()
mark.cg_start()
for _ in range(10):
    prep()
mark.cg_stop()
