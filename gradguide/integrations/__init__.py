"""Adapters to other libraries. Each submodule imports its library only when it is used.

The pipeline variants are imported here so that ``GuidedPipeline.from_pipe`` finds them (its
subclasses claim the diffusers pipelines they build for) without a module importing its own
subclass.
"""
from . import pipeline_xl  # noqa: F401  (registers GuidedXLPipeline as a GuidedPipeline variant)
