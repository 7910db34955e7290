"""See what the memory does: gate heatmaps, Engram ablation, logit lens and table statistics.

Each tool reads a trained checkpoint, returns dataclasses and writes its pictures and a JSON summary into
an output folder; :mod:`engram.cli.inspection` is their command line (``engram inspect ...``). The model is
read through forward hooks (:mod:`engram.inspection.hooks`), never changed.
"""

from engram.inspection.ablate import run_ablate
from engram.inspection.gates import run_gates
from engram.inspection.logit_lens import run_logit_lens
from engram.inspection.table_stats import run_table_stats

__all__ = ["run_ablate", "run_gates", "run_logit_lens", "run_table_stats"]
