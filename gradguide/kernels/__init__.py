"""Triton kernels of gradguide's two passes (reduce, combine, fused policy combine, clip_shift).

Only :mod:`gradguide.ops` imports this package (lazily, through
``gradguide/ops/triton_backend.py``); each kernel file states its design and limits in its
header and keeps a plain-torch ``reference`` beside the kernel. Triton's interpreter
(``TRITON_INTERPRET=1``) is picked when a kernel is defined, so set it before importing.
"""
