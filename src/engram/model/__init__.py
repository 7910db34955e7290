"""EngramLM: attention, fine-grained MoE, mHC hyper-connections and Engram in one language model."""

from engram.model.attention import Attention, KVCache, RotaryEmbedding
from engram.model.config import PRESETS, EngramLMConfig, MoEConfig
from engram.model.hyper_connections import HyperConnection, StreamMerge, sinkhorn_knopp
from engram.model.lm import Block, Decoding, EngramLM, LMOutput
from engram.model.moe import FeedForward, MoE
from engram.model.overlay import RowOverlay, StackedOverlays, overlay_rows
from engram.model.params import baseline_config, count_parameters, iso_parameter_config, param_report

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "Decoding",
    "EngramLM",
    "EngramLMConfig",
    "FeedForward",
    "HyperConnection",
    "KVCache",
    "LMOutput",
    "MoE",
    "MoEConfig",
    "RotaryEmbedding",
    "RowOverlay",
    "StackedOverlays",
    "StreamMerge",
    "baseline_config",
    "count_parameters",
    "iso_parameter_config",
    "overlay_rows",
    "param_report",
    "sinkhorn_knopp",
]
