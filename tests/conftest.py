"""Test-session setup.

Triton kernels run on the CPU through Triton's interpreter when there is no GPU; the
interpreter is chosen when a kernel is *defined*, so the variable must be set before any
kernel module is imported: here, before the tests import gradguide.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
