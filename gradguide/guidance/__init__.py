"""Guidance terms (docs/mathematics.md#guidance-terms). Each is usable with every sampler, several at once."""
from .apg import APG
from .apgmix import APGMix
from .base import GuidanceTerm, StepContext
from .cfg import CFG, CFGPlusPlus, CFGZeroStar
from .classifier import Classifier
from .fdg import FDG
from .gradient import DPS, DecodedLookAhead, LookAhead, NaiveGradient
from .interval import GuidanceInterval
from .pag import LTX2, PAG, SEG, SLG, AutoGuidance
from .perturb import Custom, Inputs, LayerSkip, Perturbation, SmoothedEnergy
from .rescale import Rescale
from .tangential import TCFG, MamboG

__all__ = ["APG", "APGMix", "AutoGuidance", "Custom", "FDG", "Inputs", "LTX2", "LayerSkip", "PAG", "Perturbation",
           "SEG", "SLG", "SmoothedEnergy", "MamboG", "TCFG", "CFG", "CFGPlusPlus", "CFGZeroStar", "Classifier", "DPS", "DecodedLookAhead", "GuidanceInterval", "GuidanceTerm", "LookAhead",
           "NaiveGradient", "Rescale", "StepContext"]
