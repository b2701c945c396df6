"""setup.py declares every third-party package that dalle_ds imports."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules() -> set[str]:
    names = set()
    for path in (ROOT / "dalle_ds").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"dalle_ds"}


def declared_distributions() -> set[str]:
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    requires = next(node.value for node in ast.walk(setup)
                    if isinstance(node, ast.keyword) and node.arg == "install_requires")
    return {re.split(r"[<>=!~ \[]", item.value)[0].lower() for item in requires.elts}


def test_every_imported_package_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {module: providers.get(module) for module in imported_top_level_modules()
                  if not declared & {name.lower() for name in providers.get(module, [module])}}
    assert not undeclared, f"imported by dalle_ds but not in setup.py's install_requires: {undeclared}"
