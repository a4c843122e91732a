"""float32 vs float64 on issue 12's precision cases (before/after table of the fixes).

Cases (tests/test_precision.py): issue 12's case (DDIM, classifier, PixelAsParam("B",
granularity="channel"), clip=True, 5 steps; eta 0 and 1, seed 0, scale 1.5), the three draws
hypothesis found at 1.0-1.5e-4, and policy C (official convention) on the general path
(dpmpp-2m, CFG 3, clip (-5, 5), the suite's Gaussian mixture), and APG (scale 3, DDIM, the
fused step) on the same mixture. The model and classifier
evaluate in float64 with float32-rounded values in both runs, exactly as the tests.

Per case and backend, max |x32 - x64| / max |x64| measured two ways:
- ``unrounded``: the float64 run starts from the unrounded float64 x_T and noise (the float32
  run from their float32 roundings) — the measure before this change;
- ``like``: both runs start from the same float32 values (the measure of the tests now);
and ``floor``: tests/test_precision.float32_floor, how far the float64 run itself moves when its
x_t is stored in float32 after every step (and x_T moves by 1e-7 relative): the conditioning.

    PYTHONPATH=<checkout> TRITON_INTERPRET=1 python benchmarks/precision_issue12.py [backends...]

(run from the checkout whose tests/ define the cases; for "before", point PYTHONPATH at the old
gradguide and keep this checkout's tests/ on sys.path, as below.)
"""
import json
import os
import sys
import time

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gradguide as gg  # noqa: E402
from gradguide import sampling  # noqa: E402
import test_precision as tp  # noqa: E402

torch.set_num_threads(1)
draw = sampling._noise


def pair(backend, seed, like, **kw):
    rounded = (lambda t: t.float()) if like else (lambda t: t)
    sampling._noise = lambda shape, gen, device, dt: rounded(draw(shape, gen, device, torch.float64)).to(dt)
    x_T = torch.randn(kw["shape"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {dt: gg.sample(x_T=rounded(x_T).to(dt) if dt == torch.float64 else x_T.to(dt),
                         execution=gg.Execution(backend=backend), generator=torch.Generator().manual_seed(seed + 1),
                         **kw)
           for dt in (torch.float64, torch.float32)}
    return tp.relative_error(out[torch.float32], out[torch.float64])


def cases():
    for eta in (0.0, 1.0):
        kw = tp.issue_case(eta)
        kw.pop("fused")
        yield f"issue case, eta {eta:g}", 0, kw
    for seed, eta, scale in [(65, 1.0, 3.26171875), (377, 1.0, 1.0), (244, 0.0, 2.5)]:
        kw = tp.issue_case(eta, seed, scale)
        kw.pop("fused")
        yield f"hypothesis seed {seed}, eta {eta:g}, scale {scale:g}", seed, kw
    terms, _, model = tp.TERMS["apg"]
    yield "APG 3, ddim (fused step)", 0, dict(model=model, shape=(8, 2), schedule=tp.GM.schedule, sampler="ddim",
                                              steps=6, guidance=terms, cond={"y": tp.Y})
    terms, _, model = tp.TERMS["cfg+C"]
    yield "cfg + C (official), dpmpp-2m, clip", 0, dict(
        model=model, shape=(8, 2), schedule=tp.GM.schedule, sampler=gg.Sampler("dpmpp-2m", clip=(-5.0, 5.0)), steps=6,
        guidance=terms, projection=gg.PixelAsParam("C", convention="official"), cond={"y": tp.Y})


backends = sys.argv[1:] or [b for b, ok in gg.ops.available_backends("cpu").items() if ok is True]
rows = []
for name, seed, kw in cases():
    sampling._noise = lambda shape, gen, device, dt: draw(shape, gen, device, torch.float64).float().to(dt)
    floor = tp.float32_floor(seed=seed, **kw)
    for backend in backends:
        t0 = time.perf_counter()
        row = {"case": name, "backend": backend, "unrounded": pair(backend, seed, False, **kw),
               "like": pair(backend, seed, True, **kw), "floor": floor}
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
print(json.dumps({"gradguide": gg.__file__, "torch": torch.__version__, "rows": rows}, indent=1))
