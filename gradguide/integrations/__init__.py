"""Adapters to other libraries. Each submodule imports its library only when it is used.

The pipeline variants are imported here so that ``GuidedPipeline.from_pipe`` finds them (its
subclasses claim the diffusers pipelines they build for) without a module importing its own
subclass.
"""
from . import pipeline_xl  # noqa: F401  (registers GuidedXLPipeline as a GuidedPipeline variant)
from . import pipeline_flow  # noqa: F401  (GuidedSD3Pipeline)
from . import pipeline_flux  # noqa: F401  (GuidedFluxPipeline)
from . import pipeline_wan  # noqa: F401  (GuidedWanPipeline)
from . import pipeline_sana  # noqa: F401  (GuidedSanaPipeline)
from . import pipeline_qwenimage  # noqa: F401  (GuidedQwenImagePipeline)
