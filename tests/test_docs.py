"""The docs cannot drift from the code: every function and test docs/EQUATIONS.md names
exists, every rule and layer has its entry, and the README's Python example runs."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EQUATIONS = ROOT / "docs" / "EQUATIONS.md"
REFERENCE = re.compile(r"`((?:gait_ref|tests)/[\w/]+\.py)::([\w.]+)`")


def references(text: str) -> list:
    return REFERENCE.findall(text)


def _defined_in_tests(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def _defined_in_library(path: str, qualname: str) -> bool:
    module = importlib.import_module(path[:-3].replace("/", "."))
    obj = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return callable(obj)


def missing(refs) -> list:
    """The references whose file, function or test does not exist."""
    gone = []
    for path, name in refs:
        if not (ROOT / path).exists():
            gone.append(f"{path} (no such file)")
        elif path.startswith("tests/") and not _defined_in_tests(ROOT / path, name):
            gone.append(f"{path}::{name}")
        elif path.startswith("gait_ref/") and not _defined_in_library(path, name):
            gone.append(f"{path}::{name}")
    return gone


def test_every_function_and_test_the_equations_page_names_exists():
    refs = references(EQUATIONS.read_text())
    assert len(refs) > 60
    assert missing(refs) == []


def test_a_renamed_function_or_test_is_caught():
    assert missing([("gait_ref/rules/targets.py", "TargetRule._recursion_renamed"),
                    ("tests/test_rules.py", "test_that_was_renamed"),
                    ("gait_ref/rules/nowhere.py", "f")]) == [
        "gait_ref/rules/targets.py::TargetRule._recursion_renamed", "tests/test_rules.py::test_that_was_renamed",
        "gait_ref/rules/nowhere.py (no such file)"]


def test_every_entry_has_a_source_its_code_and_a_test():
    sections = re.split(r"\n### ", EQUATIONS.read_text())[1:]
    assert len(sections) >= 20
    for s in sections:
        title = s.splitlines()[0]
        assert "$$" in s and "- Source:" in s, title
        code, test = s.split("- Code:")[1].split("- Test:")
        assert any(p.startswith("gait_ref/") for p, _ in references(code)), title
        assert any(p.startswith("tests/") for p, _ in references(test)), title


def test_every_rule_and_layer_has_an_entry():
    from gait_ref import layers
    text = EQUATIONS.read_text()
    for name in layers.__all__:
        assert f"::{name}." in text, name
    for heading in ("Backpropagation", "Target propagation (TP)", "Incremental TP (ITP)", "GAIT-prop's target recursion",
                    "Normalized GAIT-prop", "FA and DFA", "DTP's targets", "SDTP's targets", "L-DRL",
                    "orthogonality regularisers", "Adam"):
        assert heading in text, heading


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_the_readmes_python_example_runs(capsys):
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    angles = [float(v) for v in re.findall(r"([0-9.eE+-]+) deg", out)]
    assert angles and all(a < 1.0 for a in angles), out       # GAIT-prop = BP at orthogonal initialisation


@pytest.mark.parametrize("page", ["TRAINING.md", "GPU.md", "DISTRIBUTED.md", "DATA.md", "RELIABILITY.md",
                                  "EQUATIONS.md", "BENCHMARKS.md", "RESULTS.md"])
def test_the_readme_links_every_docs_page(page):
    assert (ROOT / "docs" / page).exists()
    assert f"docs/{page}" in (ROOT / "README.md").read_text()
