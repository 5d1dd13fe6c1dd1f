"""Saving: from a policy's decision to a committed save (parts, the pipeline, differential saves)."""
from .differential import Differential
from .parts import AUTO_INT4_MAX_RESTORES, QUANTIZE_CHOICES, PartMaker, weight_codec
from .pipeline import QUEUED_SUBSET_SAVES, SavePipeline

__all__ = ["AUTO_INT4_MAX_RESTORES", "QUANTIZE_CHOICES", "QUEUED_SUBSET_SAVES", "Differential", "PartMaker",
           "SavePipeline", "weight_codec"]
