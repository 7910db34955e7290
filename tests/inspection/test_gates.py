import html
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from inspection.inspect_helpers import variant
from matplotlib import image as mpimg
from repo_scripts import load_script

from engram.inspection.gate_page import gate_colour, render_gate_page
from engram.inspection.gates import plot_gates, run_gates, text_gates
from engram.inspection.loading import model_tokenizer, token_pieces

REPO = Path(__file__).resolve().parents[2]
ENGLISH = "By the way, Alexander the Great tamed the horse.\nThe Milky Way"
CHINESE = "亚历山大大帝驯服了马"
MARKUP = 'a <b>"bold"</b> & <script>x</script>'


@pytest.mark.parametrize("hc_mult", [1, 4], ids=["plain-residual", "mhc-4"])
def test_text_gates_shape_and_range(trained_model, hc_mult):
    model = variant(trained_model, hc_mult=hc_mult, engram_fields={"layer_ids": [0, 1]})
    tokenizer = model_tokenizer(model)
    result = text_gates(model, tokenizer, ENGLISH)
    tokens = tokenizer.encode(ENGLISH, add_special_tokens=False).ids
    assert result.gates.shape == (len(tokens), 2, hc_mult) and result.gates.dtype == np.float32
    assert float(result.gates.min()) >= 0.0 and float(result.gates.max()) <= 1.0
    assert [p.token_id for p in result.pieces] == tokens
    # the first token's gates do not depend on what follows it (causal), the BOS before it is not shown
    np.testing.assert_allclose(text_gates(model, tokenizer, "By").gates[0], result.gates[0], atol=1e-5)


def test_token_pieces_group_split_characters(trained_model):
    tokenizer = model_tokenizer(trained_model)
    ids = tokenizer.encode(CHINESE + " the", add_special_tokens=False).ids
    pieces = token_pieces(tokenizer, ids)
    assert [p.token_id for p in pieces] == ids
    assert max(p.parts for p in pieces) > 1  # a 300-id BPE splits Chinese characters into bytes
    groups = [p.text for p in pieces if p.part == p.parts]  # one entry per group
    assert "".join(groups) == CHINESE + " the"
    assert all("\ufffd" not in p.text for p in pieces)
    assert all(p.label == p.text if p.parts == 1 else p.label == f"{p.text} ({p.part}/{p.parts})" for p in pieces)


def test_page_is_self_contained_and_escaped(trained_model):
    tokenizer = model_tokenizer(trained_model)
    results = [text_gates(trained_model, tokenizer, text) for text in (ENGLISH, CHINESE, MARKUP)]
    page = render_gate_page([(r.text, r.pieces, r.gates) for r in results], [1], "gates of <model>")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    lowered = page.lower()
    for external in ("http://", "https://", "//", "<script", "<link", "src=", "url(", "@import", "@font-face"):
        assert external not in lowered.replace("<!doctype", ""), external
    assert "<b>" not in page and "<model>" not in page and "&lt;model&gt;" in page
    for result in results:
        for piece in result.pieces:
            assert html.escape(piece.text.replace("\n", "↵")) in page
    assert all(char in page for char in CHINESE)
    # one coloured cell per token, layer and branch; colours are the gates'
    cells = re.findall(r'<i class="c" style="background:(#[0-9a-f]{6})"></i>', page)
    assert len(cells) == sum(r.gates.size for r in results)
    assert cells[:4] == [gate_colour(v) for v in results[0].gates[0, 0]]


def test_run_gates_writes_page_png_and_json(engram_checkpoint, tmp_path):
    report = run_gates(engram_checkpoint, [ENGLISH, CHINESE], tmp_path / "out", device="cpu")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"gates.html", "gates.png", "gates.json"}
    summary = json.loads(report.summary.read_text())
    assert summary["layer_ids"] == [1] and summary["hc_mult"] == 4
    for entry, result in zip(summary["texts"], report.texts):
        assert len(entry["tokens"]) == len(entry["token_ids"]) == len(entry["gates"]) == len(result.pieces)
        assert np.allclose(entry["gates"], result.gates, atol=1e-5)
    assert CHINESE in report.html.read_text(encoding="utf-8")
    picture = mpimg.imread(report.png)
    assert picture.shape[0] > 200 and picture.shape[1] > 500


def test_png_says_when_a_font_is_missing(trained_model, tmp_path):
    result = text_gates(trained_model, model_tokenizer(trained_model), "ab")
    result.pieces[0] = type(result.pieces[0])(result.pieces[0].token_id, "\U0010fffd")  # no font draws this
    note = plot_gates([result], [1], tmp_path / "gates.png")
    assert note is not None and "\\U0010fffd" in note and (tmp_path / "gates.png").is_file()
    plain = text_gates(trained_model, model_tokenizer(trained_model), "ab")
    assert plot_gates([plain], [1], tmp_path / "b.png") is None


def test_bad_input_is_refused(engram_checkpoint, baseline_checkpoint, trained_model, tmp_path):
    tokenizer = model_tokenizer(trained_model)
    with pytest.raises(ValueError, match="text must not be empty"):
        text_gates(trained_model, tokenizer, "")
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        text_gates(trained_model, tokenizer, "the king " * 400)
    with pytest.raises(ValueError, match="no Engram layers"):
        run_gates(baseline_checkpoint, ["the king"], tmp_path / "b", device="cpu")
    with pytest.raises(ValueError, match="'/nonexistent/run' is not a model folder"):
        run_gates("/nonexistent/run", ["the king"], tmp_path / "c")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run_gates(engram_checkpoint, ["the king"], tmp_path / "file")


SCREENSHOT_SCRIPT = load_script("screenshot_gates")


# .ci/run installs Debian's chromium and sets ENGRAM_REQUIRE_CHROMIUM: in CI this runs, or fails.
@pytest.mark.skipif(SCREENSHOT_SCRIPT.find_browser() is None and not os.environ.get("ENGRAM_REQUIRE_CHROMIUM"),
                    reason="no Chromium on PATH: the gates page was not checked in a browser "
                           "(apt-get install chromium)")
def test_page_in_headless_chromium(engram_checkpoint, tmp_path):
    out = tmp_path / "shot"
    assert SCREENSHOT_SCRIPT.main(["--checkpoint", str(engram_checkpoint), "--text", ENGLISH, "--text", CHINESE,
                                   "--out", str(out), "--width", "900", "--height", "700"]) == 0
    shot = mpimg.imread(out / "gates_screenshot.png")[..., :3]
    assert shot.shape[:2] == (700, 900)
    # the page is drawn: white background, dark text, and the gate colours (saturated viridis cells)
    saturation = shot.max(axis=-1) - shot.min(axis=-1)
    assert (shot.min(axis=-1) > 0.95).mean() > 0.3
    assert (saturation > 0.3).mean() > 0.01


def test_ci_installs_chromium_and_requires_the_browser_test(tmp_path):
    """.ci/run installs Debian's chromium where it is missing (run here with a stand-in apt-get), leaves an
    installed one alone, and makes the browser test required."""
    script = (REPO / ".ci" / "run").read_text()
    start = script.index("if ! command -v chromium")
    install = script[start:script.index("\nfi\n", start) + 4]
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    for name, body in (("apt-get", f'echo "$@" >> {log}'), ("chromium", "")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "chromium").rename(tmp_path / "chromium")  # missing first
    for installed in (False, True):
        if installed:
            (tmp_path / "chromium").rename(bin_dir / "chromium")
        subprocess.run(["bash", "-euo", "pipefail", "-c", install], env={"PATH": str(bin_dir)}, check=True,
                       executable="/bin/bash", capture_output=True)
        calls = log.read_text().splitlines() if log.exists() else []
        assert calls == ([] if installed else ["update -qq", "install -y -qq chromium"]), installed
        log.unlink(missing_ok=True)
    assert "\nexport ENGRAM_REQUIRE_CHROMIUM=1\n" in script
    assert script.index("ENGRAM_REQUIRE_CHROMIUM") < script.index('bash -c "${quickstart[1]}"')  # before the tests
