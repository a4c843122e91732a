"""Packaging entry point. Metadata lives in pyproject.toml; this file builds the native
(csrc/) extension ``gradguide._C`` where it can:

- the C++ (CPU, OpenMP) ops when torch is importable in the build environment and a C++
  compiler works (install with ``pip install --no-build-isolation -e .`` so the build sees
  the installed torch);
- plus the CUDA ops when torch is a CUDA build (``torch.version.cuda``) and ``nvcc`` exists.

Nothing here is allowed to fail the install: without torch or a compiler the package is
installed without ``gradguide._C`` and ``gradguide.ops.available_backends()`` says why
``"native"`` is missing. ``GRADGUIDE_NO_NATIVE=1`` skips the build on purpose.
"""
import os
import shutil
import sys

from setuptools import setup


def _notice(msg: str) -> None:
    print(f"gradguide setup: {msg}", file=sys.stderr)


def _native_extensions():
    if os.environ.get("GRADGUIDE_NO_NATIVE", "") not in ("", "0"):
        _notice("GRADGUIDE_NO_NATIVE set: not building the native ops")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment (e.g. build isolation)
        _notice(f"torch is not importable here ({exc}); building without the native ops "
                "(use pip install --no-build-isolation to build them)")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = os.path.join("csrc", "gradguide_ops.cpp")
    cu = os.path.join("csrc", "gradguide_ops_cuda.cu")
    if not os.path.exists(os.path.join(here, cpp)):
        _notice(f"{cpp} not found; building without the native ops")
        return [], {}
    # -ffp-contract=off: no FMA contraction, so the AVX-512, AVX2 and baseline variants of the
    # CPU kernels (csrc/gradguide_cpu_kernels.h) round identically
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-Wno-psabi"]
    nvcc_ok = shutil.which("nvcc") is not None or cpp_extension.CUDA_HOME is not None
    if torch.version.cuda and nvcc_ok and os.path.exists(os.path.join(here, cu)):
        ext = cpp_extension.CUDAExtension(
            "gradguide._C", [cpp, cu], define_macros=[("GRADGUIDE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]}, extra_link_args=["-fopenmp"])
        _notice("building the native ops for CPU and CUDA")
    else:
        ext = cpp_extension.CppExtension("gradguide._C", [cpp], extra_compile_args=cxx,
                                         extra_link_args=["-fopenmp"])
        why = "torch is a CPU build" if not torch.version.cuda else "nvcc was not found"
        _notice(f"building the native ops for CPU only ({why})")
    return [ext], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


def _tolerant_build_ext(base):
    class BuildExt(base):
        """Build the extension, but install the package without it if compiling fails."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # a missing/broken compiler must not fail the install
                _notice(f"building the native ops failed ({exc}); installing without them")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _notice(f"building {ext.name} failed ({exc}); installing without it")

    return BuildExt


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
