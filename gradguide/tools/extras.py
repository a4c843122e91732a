"""Optional dependencies: which ``pip install "gradguide[...]"`` extra provides a module, and
the one line the command line prints when one is missing (no traceback)."""
from __future__ import annotations

import importlib
from typing import Optional

# import name -> (distribution, extra of pyproject.toml that installs it)
EXTRAS = {
    "diffusers": ("diffusers", "diffusers"),
    "transformers": ("transformers", "pipeline"),
    "sklearn": ("scikit-learn", "digits"),
    "pynvml": ("nvidia-ml-py", "profile"),
    "psutil": ("psutil", "profile"),
}


def missing_module(exc: BaseException) -> Optional[str]:
    """The top-level name of the module whose absence caused ``exc`` (following ``raise ... from``
    chains), or ``None`` when ``exc`` is not about a missing third-party module (a missing
    ``gradguide`` submodule is a bug, not a missing dependency)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = getattr(exc, "name", None)
        if isinstance(exc, ImportError) and name:
            top = name.split(".")[0]
            return None if top == "gradguide" else top
        exc = exc.__cause__ or exc.__context__
    return None


def describe(exc: BaseException) -> Optional[str]:
    """The one line for an import failure ``exc`` of a third-party module (``None`` for anything
    else): not installed, or installed but not what gradguide needs (``cannot import name ...``,
    e.g. another version than the extra pins)."""
    module = missing_module(exc)
    if module is None:
        return None
    found = exc
    while found is not None and not (isinstance(found, ImportError) and getattr(found, "name", None)):
        found = found.__cause__ or found.__context__
    if isinstance(found, ModuleNotFoundError):
        return message(module)
    hint = f': pip install "gradguide[{EXTRAS[module][1]}]" installs the tested version' if module in EXTRAS else ""
    return f"{module} is installed but does not import as gradguide needs ({' '.join(str(found).split())}){hint}"


def message(module: str) -> str:
    """One line naming what to install for ``module``."""
    if module in EXTRAS:
        dist, extra = EXTRAS[module]
        return f"{dist} is not installed: pip install \"gradguide[{extra}]\""
    return f"the Python module '{module}' is not installed"


def unavailable(module: str) -> Optional[str]:
    """``None`` when ``module`` imports, else the one-line reason (see :func:`message`)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing = missing_module(exc) or module
        return message(missing) if missing == module else f"{module} does not import ({message(missing)})"
    return None
