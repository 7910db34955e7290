"""EngramLM: attention, fine-grained MoE, mHC hyper-connections and Engram in one language model."""

from engram.model.config import PRESETS, EngramLMConfig
from engram.model.lm import EngramLM
from engram.model.moe import MoE
from engram.model.overlay import RowOverlay, row_overlays
from engram.model.params import iso_parameter_config, param_report

__all__ = [
    "PRESETS",
    "EngramLM",
    "EngramLMConfig",
    "MoE",
    "RowOverlay",
    "iso_parameter_config",
    "param_report",
    "row_overlays",
]
