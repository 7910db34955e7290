"""Matplotlib set-up shared by the inspect pictures: fonts that have the glyphs of the text.

Figures are built as :class:`matplotlib.figure.Figure` objects, without pyplot, so that importing this module
leaves the caller's matplotlib backend alone (a notebook keeps its own) and nothing needs a display.

Token text can be any script. Matplotlib (>= 3.6) falls back through a list of font families glyph by glyph,
so the list is DejaVu Sans and then fonts found for the characters it lacks: among the fonts matplotlib
knows, and through fontconfig (``fc-list :charset=...``; e.g. Debian's ``fonts-noto-cjk`` for Chinese). When
no font has a character, the picture says so in a note instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import matplotlib
from matplotlib import font_manager
from matplotlib.figure import Figure

BASE_FONT = "DejaVu Sans"
GATE_CMAP = "viridis"  # gates in [0, 1]: the same colours in the HTML page and the PNG
_FONTCONFIG_SEARCHES = 8  # characters looked up with fc-list at most, one call each
_PREFERRED_FALLBACKS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
                        "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "Noto Sans")


@dataclass(frozen=True)
class FontChoice:
    """Font families for ``rcParams["font.family"]`` and the characters none of them can draw."""

    families: list[str]
    missing: str

    @property
    def note(self) -> str | None:
        """What to print on the picture when characters will show as boxes, else ``None``."""
        if not self.missing:
            return None
        return (f"no installed font has {self.missing[:12]!r}{'...' if len(self.missing) > 12 else ''}: shown as "
                "boxes (install a font for them, e.g. Debian's fonts-noto-cjk for Chinese)")


@lru_cache(maxsize=None)
def _family_chars(family: str) -> frozenset[int] | None:
    """Code points the font matplotlib picks for ``family`` can draw, or ``None`` when it has no such font."""
    try:
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    except ValueError:
        return None
    return frozenset(font_manager.get_font(path).get_charmap())


def _fontconfig_families(char: str) -> list[str]:
    """Families fontconfig lists for ``char``, registered with matplotlib (which skips ``.ttc`` collections)."""
    if shutil.which("fc-list") is None:
        return []
    listing = subprocess.run(["fc-list", f":charset={ord(char):x}", "file"], capture_output=True, text=True,
                             check=False).stdout
    known = {entry.name for entry in font_manager.fontManager.ttflist}
    known_paths = {entry.fname for entry in font_manager.fontManager.ttflist}
    for line in sorted(listing.splitlines()):
        path = line.rsplit(":", 1)[0].strip()
        if path and path not in known_paths:
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):  # a format this matplotlib cannot read
                continue
    added = sorted({entry.name for entry in font_manager.fontManager.ttflist} - known)
    _family_chars.cache_clear()
    return added


def choose_fonts(texts: Iterable[str]) -> FontChoice:
    """Families that together draw every character of ``texts`` (as far as the machine's fonts allow)."""
    needed = {ord(c) for text in texts for c in text if not c.isspace()}
    families = [BASE_FONT]
    missing = needed - (_family_chars(BASE_FONT) or frozenset())
    candidates = list(_PREFERRED_FALLBACKS)
    searched: set[int] = set()  # characters already asked of fontconfig
    while missing:
        family = next((f for f in candidates if f not in families and (_family_chars(f) or frozenset()) & missing),
                      None)
        if family is None:
            unsearched = missing - searched
            if not unsearched or len(searched) >= _FONTCONFIG_SEARCHES:
                break
            char = min(unsearched)
            searched.add(char)
            candidates += _fontconfig_families(chr(char))
            continue
        families.append(family)
        missing -= _family_chars(family) or frozenset()
    return FontChoice(families, "".join(sorted(map(chr, missing))))


@contextmanager
def figure_style(fonts: FontChoice) -> Iterator[None]:
    """Matplotlib settings for one picture: the chosen fonts; missing-glyph warnings silenced (the note says it)."""
    with matplotlib.rc_context({"font.family": fonts.families, "font.size": 9}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        warnings.filterwarnings("ignore", message="Matplotlib currently does not support")
        yield


def save_figure(fig: Figure, path: str | os.PathLike[str], note: str | None = None) -> None:
    """Write ``fig`` as a PNG (``note`` printed in small type at the bottom left)."""
    if note:
        fig.text(0.005, 0.005, note, fontsize=7, color="dimgray", ha="left", va="bottom")
    fig.savefig(path)
