"""See what the memory does: gate heatmaps, Engram ablation, logit lens and table statistics.

Each tool reads a trained checkpoint, returns dataclasses and writes its pictures and a JSON summary into
an output folder; :mod:`engram.inspection.cli` is their command line (``engram inspect ...``). The model is
read through forward hooks (:mod:`engram.inspection.hooks`), never changed.
"""

from engram.inspection.ablate import AblationReport, CategoryLoss, TokenLoss, run_ablate
from engram.inspection.gates import GatesReport, TextGates, run_gates, text_gates
from engram.inspection.hooks import recorded_gates, recorded_residuals, replaced_engram_output, zeroed_engram
from engram.inspection.logit_lens import LensCurve, LogitLensReport, logit_lens, run_logit_lens
from engram.inspection.table_stats import (HeadStats, LayerStats, TableReport, hashing_statistics,
                                           run_deepseek_v41_table_stats, run_table_stats, table_statistics)

__all__ = [
    "AblationReport",
    "CategoryLoss",
    "GatesReport",
    "HeadStats",
    "LayerStats",
    "LensCurve",
    "LogitLensReport",
    "TableReport",
    "TextGates",
    "TokenLoss",
    "hashing_statistics",
    "logit_lens",
    "recorded_gates",
    "recorded_residuals",
    "replaced_engram_output",
    "run_ablate",
    "run_deepseek_v41_table_stats",
    "run_gates",
    "run_logit_lens",
    "run_table_stats",
    "table_statistics",
    "text_gates",
    "zeroed_engram",
]
