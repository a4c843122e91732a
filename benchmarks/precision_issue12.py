"""float32 vs float64 on issue 12's precision case (before/after table of the fix).

DDIM, classifier scale 1.5, PixelAsParam("B", granularity="channel"), clip=True, 5 steps,
eta 0 and 1, on the reference and native backends; the same x_T and noise (drawn in float64,
rounded) and the same model (evaluated in float64, values rounded to float32) in both runs,
exactly as tests/test_precision.py. Prints JSON rows: max |x32 − x64| / max |x64|, and the
largest float32 difference between backends.

    PYTHONPATH=<checkout> python benchmarks/precision_issue12.py
"""
import json
import sys

import torch

sys.path.insert(0, "tests")
import gradguide as gg  # noqa: E402
from gradguide import sampling  # noqa: E402
import test_precision as tp  # noqa: E402

draw = sampling._noise
sampling._noise = lambda shape, gen, device, dt: draw(shape, gen, device, torch.float64).to(dt)
rows = []
for eta in (0.0, 1.0):
    kw = tp.issue_case(eta)
    kw.pop("fused")
    outs32 = {}
    for backend in ("reference", "native"):
        x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = {dt: gg.sample(x_T=x_T.to(dt), backend=backend, generator=torch.Generator().manual_seed(1), **kw)
               for dt in (torch.float64, torch.float32)}
        outs32[backend] = out[torch.float32]
        rows.append({"eta": eta, "backend": backend,
                     "rel_err_f32_vs_f64": tp.relative_error(out[torch.float32], out[torch.float64])})
    rows.append({"eta": eta, "backend": "native vs reference (float32)",
                 "rel_err_f32_vs_f64": tp.relative_error(outs32["native"], outs32["reference"].double())})
print(json.dumps({"gradguide": gg.__file__, "rows": rows}, indent=1))
