"""The house rules: floors (pipelines and components above steps, steps above the library, the
library without kfp), no import circles, one name per module, a docstring per package."""

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LIBRARY = ROOT / "cockatoo_lib"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in LIBRARY.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _library_imports(module: str) -> set[str]:
    return {name for name in _imports(MODULES[module])
            if name in MODULES and name != module and not module.startswith(f"{name}.")}


def test_no_import_circles_in_the_library():
    graph = {module: _library_imports(module) for module in MODULES}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    circles = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert circles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_library_imports_no_kfp_and_nothing_above_it(module):
    above = {"cockatoo_lib.steps", "cockatoo_lib.cli"}
    imports = _imports(MODULES[module])
    assert not {name for name in imports if name.split(".")[0] in ("kfp", "components", "pipelines")}
    if module not in above:
        assert not imports & above, f"{module} imports the steps or the CLI, which sit above it"


def test_each_library_module_has_its_own_name_and_each_package_says_what_lives_there():
    names = Counter(path.stem for path in LIBRARY.rglob("*.py") if path.stem != "__init__")
    assert [name for name, count in names.items() if count > 1] == []
    assert [name for name in names if "registry" in name] == ["model_registry"]  # MLflow's, alone
    for package in LIBRARY.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(package.read_text()))
        assert doc and len(doc) > 40, f"{package.parent.name}/ says nothing about what lives there"


# Processes that do not train (a server, a step's pod, a predict command) start without the heavy
# libraries they do not use: seconds of import each time (docs/testing.md, "Time and coverage").
NOT_IMPORTED = """
import sys
import cockatoo_lib.release.scoring  # the score pipeline's plan and finish steps
assert "torch" not in sys.modules, "scoring imports torch"
import cockatoo_lib.release.predict, cockatoo_lib.release.gate  # a server, predict, the gate step
assert "transformers.trainer" not in sys.modules, "predict or the gate imports the trainer"
"""


def test_modules_that_do_not_train_start_without_the_trainer():
    import subprocess
    import sys

    from tests.helpers import without_coverage

    done = subprocess.run([sys.executable, "-c", NOT_IMPORTED], capture_output=True, text=True, timeout=120,
                          env=without_coverage())
    assert done.returncode == 0, done.stderr[-500:]
