"""Test-session setup.

Triton kernels run on the CPU through Triton's interpreter when there is no GPU; the
interpreter is chosen when a kernel is *defined*, so the variable must be set before any
kernel module is imported: here, before the tests import gradguide.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI draws the same hypothesis examples on every run (a failing CI run can be replayed); local runs
# keep drawing fresh ones, which is how new cases are found
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a loaded 2-core machine two threads can be 10-50x
    slower (OpenMP spinning) for the small models of the benchmark and profiler tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (``pytestmark = pytest.mark.usefixtures(...)``):
    tiny models, where threads only add overhead and oversubscribe a shared 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _background_needs(item, jobs):
    return [name for name in getattr(item, "fixturenames", ()) if name in jobs]


@pytest.hookimpl(trylast=True)   # after -k / -m deselection: only the tests that will run count
def pytest_collection_modifyitems(session, config, items):
    """Tests that need a background job (tests/background.py) go last, in the order they first
    need their jobs, so that the jobs overlap with the rest of the suite."""
    import background
    jobs = background.jobs()
    order = []   # fixture names, in the order the tests first need them
    for item in items:
        order += [n for n in _background_needs(item, jobs) if n not in order]
    if not order:
        return
    rank = {name: i for i, name in enumerate(order)}
    waiting = [item for item in items if _background_needs(item, jobs)]
    rest = [item for item in items if not _background_needs(item, jobs)]
    waiting.sort(key=lambda item: min(rank[n] for n in _background_needs(item, jobs)))   # stable
    items[:] = rest + waiting


def pytest_collection_finish(session):
    """Start the background jobs the selected tests need, in the order they need them."""
    import background
    if session.config.option.collectonly:
        return
    jobs = background.jobs()
    order = []
    for item in session.items:
        order += [n for n in _background_needs(item, jobs) if n not in order]
    if order:
        background.start([jobs[n] for n in order])


def pytest_sessionfinish(session, exitstatus):
    import background
    background.stop()
