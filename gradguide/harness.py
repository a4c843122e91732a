"""Loading the benchmark harness, which lives in the source checkout's ``benchmarks/`` folder.

``gradguide bench`` and ``gradguide profile`` run workloads defined there; the folder is not
part of the installed package, so an editable install (``pip install --no-build-isolation -e .``)
is needed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name: str, command: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (once) for ``command`` (named in the error message)."""
    key = f"gradguide_benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = os.path.join(BENCHMARKS, name + ".py")
    if not os.path.exists(path):
        raise SystemExit(f"{command}: {path} not found: the benchmark harness ships with the source checkout "
                         "(install it editable: pip install --no-build-isolation -e .)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module
