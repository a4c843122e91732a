"""Guidance terms (SPEC.md §3). Each is usable with every sampler, several at once."""
from .apg import APG
from .base import GuidanceTerm, StepContext
from .cfg import CFG, CFGPlusPlus, CFGZeroStar
from .classifier import Classifier
from .gradient import DPS, LookAhead, NaiveGradient
from .rescale import Rescale

__all__ = ["APG", "CFG", "CFGPlusPlus", "CFGZeroStar", "Classifier", "DPS", "GuidanceTerm", "LookAhead",
           "NaiveGradient", "Rescale", "StepContext"]
