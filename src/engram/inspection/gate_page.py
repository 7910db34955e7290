"""The gate heatmap as one self-contained HTML page: inline CSS, no script, no external URL or font.

Every token of a text is a small column: its text on a background coloured by its mean gate, and under it
one row of cells per Engram layer, one cell per residual branch, coloured by that gate. Hovering a token
shows its id and exact values. All text from the model or the user is HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps

from engram.inspection.loading import TokenPiece
from engram.inspection.plotting import GATE_CMAP

_FONTS = ('system-ui, "DejaVu Sans", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "PingFang SC", '
          '"Microsoft YaHei", "WenQuanYi Zen Hei", sans-serif')
_CSS = """
body { font-family: %(fonts)s; margin: 24px; color: #1d1d1f; background: #fff; max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta, .help { color: #555; font-size: 13px; margin: 4px 0; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 13px; margin: 12px 0; }
.bar { width: 240px; height: 12px; border-radius: 2px; background: linear-gradient(to right, %(stops)s); }
.flow { display: flex; flex-wrap: wrap; gap: 8px 2px; align-items: flex-start; }
.tok { display: inline-flex; flex-direction: column; min-width: 16px; }
.t { white-space: pre; padding: 2px 3px; border-radius: 3px; font-size: 16px; line-height: 1.35;
     text-align: center; }
.t sub { font-size: 9px; }
.layer { display: flex; height: 7px; margin-top: 1px; }
.c { flex: 1; }
.br { flex-basis: 100%%; height: 0; }
table { border-collapse: collapse; font-size: 13px; margin-top: 10px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f6; } td.l { text-align: left; white-space: pre; }
"""
_SHOWN_EXTREMES = 8


def gate_colour(value: float) -> str:
    """``#rrggbb`` of a gate value in [0, 1] on the page's colour map."""
    r, g, b, _ = colormaps[GATE_CMAP](float(np.clip(value, 0.0, 1.0)))
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _text_colour(value: float) -> str:
    r, g, b, _ = colormaps[GATE_CMAP](float(np.clip(value, 0.0, 1.0)))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def shown_text(text: str) -> str:
    """Token text made visible: newlines and tabs as arrows (spaces stay, the page preserves them)."""
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def _token_html(piece: TokenPiece, gates: np.ndarray, layer_ids: Sequence[int]) -> str:
    """One token's column; ``gates`` is ``[L, M]``."""
    mean = float(gates.mean())
    values = "; ".join(f"block {layer}: " + " ".join(f"{v:.3f}" for v in row) for layer, row in zip(layer_ids, gates))
    title = f"{piece.label!r} id {piece.token_id} | mean {mean:.3f} | {values}"
    part = f"<sub>{piece.part}/{piece.parts}</sub>" if piece.parts > 1 else ""
    rows = "".join('<div class="layer">' + "".join(f'<i class="c" style="background:{gate_colour(v)}"></i>'
                                                   for v in row) + "</div>" for row in gates)
    text = (f'<span class="t" style="background:{gate_colour(mean)};color:{_text_colour(mean)}">'
            f"{html.escape(shown_text(piece.text))}{part}</span>")
    column = f'<div class="tok" title="{html.escape(title, quote=True)}">{text}{rows}</div>'
    return column + ('<div class="br"></div>' if "\n" in piece.text else "")


def _stats_table(gates: np.ndarray, layer_ids: Sequence[int]) -> str:
    """Mean / min / max gate per layer and branch of one text (``gates`` ``[T, L, M]``)."""
    head = "<tr><th>block</th><th>branch</th><th>mean</th><th>min</th><th>max</th></tr>"
    rows = [f"<tr><td>{layer}</td><td>{m}</td><td>{gates[:, i, m].mean():.3f}</td><td>{gates[:, i, m].min():.3f}"
            f"</td><td>{gates[:, i, m].max():.3f}</td></tr>"
            for i, layer in enumerate(layer_ids) for m in range(gates.shape[2])]
    return f"<table>{head}{''.join(rows)}</table>"


def _extremes(pieces: Sequence[TokenPiece], gates: np.ndarray) -> str:
    """The tokens with the highest and the lowest mean gate."""
    means = gates.reshape(len(pieces), -1).mean(axis=1)
    order = np.argsort(-means, kind="stable")
    count = min(_SHOWN_EXTREMES, len(pieces))

    def listing(indices: np.ndarray) -> str:
        return ", ".join(f"<code>{html.escape(repr(pieces[i].label))}</code> {means[i]:.2f}" for i in indices)

    return (f'<p class="help">highest mean gate: {listing(order[:count])}</p>'
            f'<p class="help">lowest mean gate: {listing(order[::-1][:count])}</p>')


def render_gate_page(texts: Sequence[tuple[str, Sequence[TokenPiece], np.ndarray]], layer_ids: Sequence[int],
                     title: str) -> str:
    """The HTML page for ``texts``: ``(text, pieces [T], gates [T, L, M] in [0, 1])`` each.

    ``layer_ids`` names the ``L`` Engram blocks (0-based); ``title`` heads the page (escaped).
    """
    stops = ", ".join(gate_colour(v) for v in np.linspace(0.0, 1.0, 11))
    branches = texts[0][2].shape[2] if texts else 0
    parts = [
        "<!DOCTYPE html>",
        '<html lang="und"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS % {'fonts': _FONTS, 'stops': stops}}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Engram at block{"s" if len(layer_ids) > 1 else ""} '
        f'{", ".join(map(str, layer_ids))} (0-based), {branches} residual branch{"es" if branches != 1 else ""}. '
        "Gate &alpha; = sigmoid(sign(g)&middot;&radic;|g|), g = &lang;RMSNorm(h), RMSNorm(W<sub>K</sub>e)&rang;"
        "/&radic;D: near 1 the memory read for the last tokens is added, near 0 it is suppressed.</p>",
        '<p class="help">Each token: its text on its mean gate; under it one row of cells per Engram block (top: '
        "first block), one cell per branch (left: branch 0). Hover a token for its id and values. The BOS token "
        "the model reads first is not shown.</p>",
        '<div class="legend">0<div class="bar"></div>1</div>',
    ]
    for text, pieces, gates in texts:
        parts.append(f"<h2>{html.escape(text)}</h2>")
        parts.append('<div class="flow">' + "".join(_token_html(p, g, layer_ids) for p, g in zip(pieces, gates))
                     + "</div>")
        parts.append(_extremes(pieces, gates))
        parts.append(_stats_table(gates, layer_ids))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
