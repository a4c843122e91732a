import sys, torch
sys.path.insert(0, ".")
torch.set_num_threads(1)
from gradguide.bench import meta, ops as b
rows = b.step_rows(False, torch.device("cpu"), torch.float32, 7)
commit, date = meta.git_commit(), meta.now()
md = ("# Whole guided step, 1 thread: general vs fused vs torch.compile(fullgraph=True) of the fused step\n\n"
      f"- {meta.device_name(torch.device('cpu'))}; torch {torch.__version__}; commit {commit}; {date}\n"
      "- command: `OMP_NUM_THREADS=1 python -c \"from gradguide.bench import ops as b; b.step_rows(False, cpu, float32, 7)\"`\n"
      "- cheap elementwise model; interleaved, median of 7 x median-of-3; shared 2-core CPU (load ~12): ratios only\n"
      + b.step_markdown(rows))
meta.write_report("benchmarks/results", f"steps-cpu-1thread-{date[:10]}", {"date": date, "commit": commit, "threads": 1, "rows": rows}, md)
print(md)
