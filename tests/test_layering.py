"""The package's imports point one way: nets < model config < module and connectors < entry point.

A module that imports a layer above its own (even inside a function, where Python hides the
cycle until the call) fails here, and so does any module that cannot be imported on its own.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "rllib_trajenc"

# The lowest layer first; a module may import only its own layer or those below it. An entry
# is one module, or with ".*" every module below a package; the most specific entry decides.
LAYERS: list[tuple[str, ...]] = [
    ("rllib_trajenc.nets", "rllib_trajenc.nets.*", "rllib_trajenc.envs", "rllib_trajenc.envs.*"),
    ("rllib_trajenc.rllib.config",),
    ("rllib_trajenc.rllib.*",),  # the module, its connector pieces and their helpers
    ("rllib_trajenc.rllib.entry_point", "rllib_trajenc.rllib", "rllib_trajenc"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(path) for path in PACKAGE_DIR.rglob("*.py"))


def layer_of(module: str) -> int:
    exact = [index for index, entries in enumerate(LAYERS) if module in entries]
    if exact:
        return exact[0]
    below = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries
             if entry.endswith(".*") and module.startswith(entry[:-1])]
    if not below:
        raise AssertionError(f"{module} is in no layer of LAYERS; add it to one")
    return max(below)[1]


def package_imports(module: str) -> set[str]:
    """Every rllib_trajenc module that ``module``'s source imports, at any depth of its code."""
    path = PACKAGE_DIR.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    is_package = path.name == "__init__.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import name` imports the submodule package.name when there is one.
            imported.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                            for alias in node.names)
    return {name for name in imported if name == "rllib_trajenc" or name.startswith("rllib_trajenc.")}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_layer_above_its_own(module):
    above = sorted(name for name in package_imports(module) if layer_of(name) > layer_of(module))
    assert not above, f"{module} (layer {layer_of(module)}) imports higher layers: {above}"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(module):
    """And the networks, the envs and the package's top level load without Ray."""
    code = f"import sys, {module}; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if layer_of(module) == 0 or module == "rllib_trajenc":
        assert result.stdout.strip() == "False", f"importing {module} loads Ray"
