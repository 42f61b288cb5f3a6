"""The package's layers: no import circles, lower layers never import higher ones, and the
byte-level format, the images and the entropy coders load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vaezip

ROOT = Path(vaezip.__file__).parent
LAYERS = ["imaging", "entropy", "format", "network", "coding", "evaluation", "training"]
"""Bottom to top: a module may import its own layer and the ones before it."""
TORCH_FREE = ["imaging", "entropy", "format"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("vaezip", *parts)).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """vaezip module -> the vaezip modules it imports, at module level or inside functions."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else len(LAYERS)


def test_every_module_sits_in_a_layer_or_is_the_facade():
    top = {m for m in _imports() if _layer(m) == len(LAYERS)}
    # An installed package also holds vaezip.cli and vaezip.models (folders cli/ and models/).
    beside = {m for m in top if m.startswith(("vaezip.cli", "vaezip.models"))}
    assert top - beside == {"vaezip", "vaezip.api", "vaezip.errors", "vaezip.files",
                            *(f"vaezip.{layer}" for layer in LAYERS)}


def test_no_import_circles():
    edges = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_lower_layers_never_import_higher_ones():
    for module, targets in _imports().items():
        for target in targets:
            if _layer(target) < len(LAYERS) and _layer(module) < len(LAYERS):
                assert _layer(target) <= _layer(module), f"{module} imports {target}"


def test_format_images_and_coders_load_without_torch():
    modules = [m for m in _imports() if _layer(m) < len(LAYERS) and m.split(".")[1] in TORCH_FREE]
    assert len(modules) == 9
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
