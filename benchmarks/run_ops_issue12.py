import sys, torch
sys.path.insert(0, ".")
torch.set_num_threads(2)
from gradguide.bench import ops as b
b.FULL_SIZES = [("SD latent B=1", (1, 4, 64, 64)), ("ADM-256 B=64", (64, 3, 256, 256))]
res = b.run(quick=False, device="cpu", backends=["reference", "native"], workloads=["reduce+combine", "pxp-a", "apg"],
            reps=5, compile_reference=False, progress=False)
cmd = ("OMP_NUM_THREADS=2 python -c 'bench_ops.FULL_SIZES = [SD latent B=1, ADM-256 B=64]; bench_ops.run(quick=False, "
       "device=cpu, backends=[reference, native], workloads=[reduce+combine, pxp-a, apg], reps=5, compile_reference=False)' "
       "(script: benchmarks/run_ops_issue12.py); step rows: SD latent B=1 and B=8")
print(b.write(res, "benchmarks/results", note="2-core CPU shared with six other sessions' test runs (load average ~15): "
              "absolute times and bandwidths are depressed and noisy; compare rows of one size. Command: " + cmd))
