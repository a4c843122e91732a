"""The installable benchmark and verification harness: workloads, suites, the fake-CUDA dry
run, kernel compile gates and GPU-cost projections (``gradguide bench|profile|dryrun|check-kernels``)."""
