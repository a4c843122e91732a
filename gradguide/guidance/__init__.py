"""Guidance terms (docs/mathematics.md#guidance-terms). Each is usable with every sampler, several at once."""
from .apg import APG
from .base import GuidanceTerm, StepContext
from .cfg import CFG, CFGPlusPlus, CFGZeroStar
from .classifier import Classifier
from .gradient import DPS, DecodedLookAhead, LookAhead, NaiveGradient
from .rescale import Rescale

__all__ = ["APG", "CFG", "CFGPlusPlus", "CFGZeroStar", "Classifier", "DPS", "DecodedLookAhead", "GuidanceTerm", "LookAhead",
           "NaiveGradient", "Rescale", "StepContext"]
