"""Guards that keep a sampling step free of host synchronisation.

:func:`forbid_host_sync` makes any ``.item()``, ``.tolist()``, ``.numpy()``, ``float(t)``,
``int(t)``, ``t.__index__()`` or tensor-valued ``if`` raise :class:`HostSyncError` while it is
active, and, where CUDA is initialised, also sets ``torch.cuda.set_sync_debug_mode("error")``
so a synchronising CUDA call raises too. ``gradguide.sample(...,
diagnostics=Diagnostics(check_sync=True))`` runs every step (not the callback) under it.
"""
from __future__ import annotations

import contextlib

import torch

_GUARDED = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostSyncError(RuntimeError):
    pass


def _raiser(name):
    def raiser(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name} was called inside a sampling step: it synchronises with the host "
                            "(keep values as tensors, or read them after the step)")
    return raiser


@contextlib.contextmanager
def forbid_host_sync():
    own = {name: torch.Tensor.__dict__[name] for name in _GUARDED if name in torch.Tensor.__dict__}
    cuda_mode = None
    try:
        for name in _GUARDED:
            setattr(torch.Tensor, name, _raiser(name))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        for name in _GUARDED:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)
        if cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(cuda_mode)
