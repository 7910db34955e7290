"""The package's imports point one way: no cycle between modules or packages, and no layer imports a higher one
(``scripts/import_graph.py`` reads the graph with ``ast``; ``LAYERS`` there is the order)."""

from pathlib import Path

from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
graph_tool = load_script("import_graph")
GRAPH = graph_tool.module_graph()


def test_the_graph_covers_the_package():
    assert set(graph_tool.module_files().values()) == set((REPO / "src" / "engram").rglob("*.py"))
    assert "engram.model.lm" in GRAPH["engram.model.params"]  # a real edge, read from the source


def test_no_module_imports_itself_round_a_cycle():
    found = [" -> ".join(graph_tool.cycle_in(GRAPH, component)) for component in graph_tool.cycles(GRAPH)]
    assert not found, "import cycles between modules:\n" + "\n".join(found)


def test_no_cycle_between_packages():
    units = graph_tool.unit_graph(GRAPH)
    found = [" -> ".join(graph_tool.cycle_in(units, component)) for component in graph_tool.cycles(units)]
    assert not found, "import cycles between top-level packages and modules:\n" + "\n".join(found)


def test_no_layer_imports_a_higher_one():
    found = graph_tool.layer_violations(GRAPH)
    assert not found, "imports against the layer order (LAYERS in scripts/import_graph.py):\n" + "\n".join(found)


def test_kernels_import_only_kernels():
    outside = [f"{module} -> {target}" for module, targets in GRAPH.items() if graph_tool.unit(module) == "kernels"
               for target in targets if graph_tool.unit(target) != "kernels"]
    assert not outside, "kernels import outside engram.kernels:\n" + "\n".join(outside)


def test_design_doc_draws_the_current_graph(capsys):
    assert graph_tool.main(["--mermaid"]) == 0
    drawn = capsys.readouterr().out.strip() in (REPO / "docs" / "design.md").read_text()
    assert drawn, "docs/design.md's package graph is stale: paste in `python scripts/import_graph.py --mermaid`"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "engram" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "engram"


def test_every_kind_of_import_is_an_edge(tmp_path):
    source = _write(tmp_path, {
        "__init__.py": "from engram.config import Config\n",
        "kernels/__init__.py": "",
        "kernels/op.py": "from ..config import Config\n",  # relative, two levels up
        "config.py": "def sizes():\n    from engram import hashing  # a module, not a name\n    return hashing\n",
        "hashing.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import Config\n",
        "cli.py": "import importlib\nimport os\nMODULE = importlib.import_module('engram.kernels.op')\n",
        "demo.py": "import engram.kernels.op as op\nfrom engram.kernels import op as again\n"
                   "from engram.cli import MODULE\n",
    })
    graph = graph_tool.module_graph(source)
    assert graph == {
        "engram": {"engram.config"},
        "engram.kernels": set(),
        "engram.kernels.op": {"engram.config"},
        "engram.config": {"engram.hashing"},
        "engram.hashing": {"engram.config"},
        "engram.cli": {"engram.kernels.op"},
        "engram.demo": {"engram.kernels.op", "engram.cli"},
    }
    problems = graph_tool.problems(graph)
    assert "module cycle: engram.config -> engram.hashing -> engram.config (strongly connected: engram.config, " \
           "engram.hashing)" in problems
    assert "package cycle: config -> hashing -> config (strongly connected: config, hashing)" in problems
    assert "layer order: engram.kernels.op -> engram.config: kernels imports nothing outside kernels" in problems
    assert "layer order: engram.demo -> engram.cli: layer apps imports the higher layer cli" in problems


def test_units_outside_the_layers_are_named(tmp_path):
    source = _write(tmp_path, {"__init__.py": "", "newthing.py": "import engram.config\n", "config.py": ""})
    assert graph_tool.layer_violations(graph_tool.module_graph(source)) == [
        "newthing is in no layer of LAYERS in import_graph.py"]


def test_the_pictures_leave_out_implied_arrows():
    units = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert graph_tool.reduced(units) == {"a": {"b"}, "b": {"c"}, "c": set()}
