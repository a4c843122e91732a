"""``gradguide dryrun``: the GPU path of a guided step, run without a GPU on fake tensors.

Every tensor of the step — model weights, ``x_t``, the sampler's tables, guidance inputs — is
a :class:`~torch._subclasses.fake_tensor.FakeTensor` on a fake device: ops propagate shapes,
dtypes and devices, no data is computed. Running :func:`gradguide.sampling.step` (and the graph
stepper's bookkeeping, :class:`gradguide.graphs.GraphCache` in emulation) on them proves:

- **no CPU tensor enters a GPU step**: the mode is strict (``allow_non_fake_inputs=False``):
  a real tensor raises, and a fake CPU tensor mixed with the device's raises
  ``FakeTensorDeviceMismatchError``, as a real CUDA op would;
- **no host sync and no data-dependent Python branch**: a fake tensor has no value, so
  ``.item()``, ``.tolist()``, ``bool(t)``, ``if t:`` raise (and :func:`gradguide.debug.forbid_host_sync`
  is active, naming the call);
- **every op traceable**: every aten op and custom op (``gradguide::reduce/combine``) needs a
  fake/meta kernel to run at all.

A :class:`Counter` (a ``TorchDispatchMode`` inside the fake mode) attributes each op to a phase
— ``forward`` / ``backward`` (the model, classifier, decoder: everything wrapped as a model,
via :func:`gradguide.bench.profiling.phased`), ``guidance`` (the rest of the step: guidance terms,
coefficient programs, reduce/combine, sampler, noise) — and counts per phase: kernel launches
(one per aten or custom op, zero for views and metadata ops: :data:`ZERO_LAUNCH`), bytes read
and written by *large* tensors (at least as many elements as ``x_t``; all bytes too, for the
roofline), FLOPs (torch's flop registry: matmuls, convolutions, attention) and the peak of live
tensor bytes (storages alive, tracked by weak references: what the CUDA allocator would hold).

**Devices.** The fake device is ``cuda``. A CPU-only torch cannot run *autograd* on
CUDA-typed tensors, fake or not (the engine needs a CUDA device guard and accelerator hooks and
aborts the process without them), so steps that take a vector-Jacobian product (classifier, G,
G_loss, DPS — and so all three paper workloads) run on the fake ``meta`` device. It proves the
same three properties (a CPU tensor still raises a device mismatch, values still do not exist);
what it does not exercise is host code that branches on ``device.type == "cuda"`` (backend
resolution is pinned explicitly here; graph capture is emulated on either device). Each row
says which device ran.

Host-side preparation (schedule tables, validation: :func:`gradguide.sampling.prepare_run`) runs
before the mode is entered, on the ``meta`` device; the prepared run's tensors and the modules'
weights are then converted to fake tensors (weights are built on ``meta``: no memory, no init).
"""
from __future__ import annotations

# the package's parts, by concern: fake tensors and counting (fake), one dry run (step), the
# workloads (workloads), the report and the docs block (report), the command (cli)
from .cli import add_arguments, default_workloads, run_cli
from .fake import FAKE_DEVICES, PHASES, ZERO_LAUNCH, Counter, FakeWorld, Tracker, fake_cuda_status, pick_backend, \
    probe_backend
from .report import (BRANCH_TARGETS, DOCS_BEGIN, DOCS_END, PAPER, PAPER_FIGURES, TARGET_LAUNCHES, TARGET_RATIO,
                     TARGETS, build_report, header, markdown, projection_table, stem, summarize, targets_table, write,
                     write_docs)
from .step import PREPARE_ARGS, dry_run, minimum_bytes
from .workloads import (BRANCH_GUIDANCE, BRANCH_PROJECTIONS, GUIDANCE, PROJECTIONS, SAMPLER_VARIANTS, SAMPLERS,
                        TinyDiT, paper_workload, run_all_combinations, run_combination, run_workload)
