"""The package's layout rules, checked on the source (parsed with ``ast``, nothing imported).

One test per source file; a failure lists every broken rule as ``path:line: rule: detail``.

* ``private-import``: a module uses another module's private name
  (``from .x import _y``, ``from pyro_flowguide.x import _y``, ``x._y`` on an imported package module).
* ``train-import``: a module below the trainer imports ``pyro_flowguide.train``.
* ``layer-order``: a module imports one of a higher layer (imports inside functions count too), in the order
  ``_zuko, bijections, tracing -> flows -> transforms -> guides -> diagnostics -> train``.
* ``file-size``, ``class-size``, ``module-docstring``: more than 500 lines in a file, 300 in a class,
  30 in a module docstring.
* ``per-seed-figures``: a docstring or comment quotes per-seed figures (they belong in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pyro_flowguide"
SOURCES = sorted((ROOT / PACKAGE).rglob("*.py"))

MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300
MAX_MODULE_DOCSTRING_LINES = 30
PER_SEED_FIGURES = re.compile(r"seeds? [0-9]+ ?- ?[0-9]+|0\.[0-9]{3} / 0\.[0-9]{3}", re.IGNORECASE)

#: Layer of each top-level module or sub-package; a module never imports one of a higher layer.
LAYERS = {
    "_zuko": 0,
    "bijections": 0,
    "tracing": 0,
    "_deprecated": 0,
    "arviz_compat": 0,
    "flows": 1,
    "transforms": 2,
    "guides": 3,
    "diagnostics": 4,
    "train": 5,
}
TOP = 6  # the package itself, demo, examples and the alias modules: above every layer


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SOURCES}


def _moved_aliases() -> set[str]:
    """The one-release alias modules: the keys of ``MOVED`` in ``_deprecated.py``."""
    tree = ast.parse((ROOT / PACKAGE / "_deprecated.py").read_text())
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == "MOVED" for t in targets
        ):
            return {f"{PACKAGE}.{name}" for name in ast.literal_eval(node.value)}
    raise AssertionError("pyro_flowguide/_deprecated.py defines no MOVED table")


ALIASES = _moved_aliases()
# May import the trainer: the trainer itself, and what sits on top of the package.
TRAIN_IMPORTERS = {PACKAGE, f"{PACKAGE}.demo", f"{PACKAGE}.examples"} | ALIASES


def _layer(module: str) -> int | None:
    """The layer of a package module (``TOP`` above all layers; ``None`` if it has none)."""
    parts = module.split(".")
    if module in TRAIN_IMPORTERS:
        return TOP
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _known(module: str) -> str | None:
    """The longest prefix of ``module`` that is a package module."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _import_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, tree: ast.AST):
    """Yields ``(line, target module, imported name or None, bound name or None)`` for package imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target is not None:
                    bound = alias.asname or alias.name.split(".")[0]
                    yield node.lineno, target, None, (bound, target if alias.asname else _known(bound))
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(module, path, node)
            if _known(base) is None:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                bound = alias.asname or alias.name
                if sub in MODULES:
                    yield node.lineno, sub, None, (bound, sub)
                else:
                    yield node.lineno, _known(base), alias.name, None


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def _private_attributes(tree: ast.AST, bound: dict[str, str]):
    """Yields ``(line, module, name)`` for ``module._name`` on names bound to package modules."""
    seen = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _attribute_chain(node)
        if chain is None or chain[0] not in bound:
            continue
        mod = bound[chain[0]]
        for part in chain[1:]:
            if f"{mod}.{part}" in MODULES:
                mod = f"{mod}.{part}"
                continue
            if _is_private(part) and (node.lineno, mod, part) not in seen:
                seen.add((node.lineno, mod, part))
                yield node.lineno, mod, part
            break


def _docstrings(tree: ast.AST):
    """Yields ``(first line, text)`` of every module, class and function docstring."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    yield body[0].lineno, body[0].value.value


def violations(path: Path) -> list[str]:
    """Every rule ``path`` breaks, one ``path:line: rule: detail`` string each."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    module = _module_name(path)
    rel = path.relative_to(ROOT)
    out = []

    def report(line: int, rule: str, detail: str) -> None:
        out.append(f"{rel}:{line}: {rule}: {detail}")

    layer = _layer(module)
    if layer is None:
        report(1, "layer-order", f"{module} is in no layer of the import order (tests/test_layout.py LAYERS)")
    bound: dict[str, str] = {}
    for line, target, name, binding in _imports(module, path, tree):
        if binding is not None and binding[1] is not None:
            bound[binding[0]] = binding[1]
        if name is not None and _is_private(name) and target != module:
            report(line, "private-import", f"imports the private name {name} of {target}")
        if module == f"{PACKAGE}.examples":
            report(line, "layer-order", f"examples imports {target}; it may import only pyro, torch and numpy")
            continue
        is_train = target == f"{PACKAGE}.train" or target.startswith(f"{PACKAGE}.train.")
        if is_train and module not in TRAIN_IMPORTERS and not module.startswith(f"{PACKAGE}.train"):
            report(line, "train-import", f"{module} is below the trainer but imports {target}")
        target_layer = _layer(target)
        if layer is not None and layer < TOP and (target_layer is None or target_layer > layer):
            report(line, "layer-order", f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    for line, target, name in _private_attributes(tree, bound):
        if target != module:
            report(line, "private-import", f"uses the private name {name} of {target}")

    n_lines = len(source.splitlines())
    if n_lines > MAX_FILE_LINES:
        report(1, "file-size", f"{n_lines} lines (at most {MAX_FILE_LINES})")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            if size > MAX_CLASS_LINES:
                report(node.lineno, "class-size", f"class {node.name} has {size} lines (at most {MAX_CLASS_LINES})")
    module_docstring = ast.get_docstring(tree, clean=False)
    if module_docstring is not None:
        size = len(module_docstring.splitlines())  # the closing quotes' own line does not count
        if size > MAX_MODULE_DOCSTRING_LINES:
            report(tree.body[0].lineno, "module-docstring", f"{size} lines (at most {MAX_MODULE_DOCSTRING_LINES})")

    for start, text in _docstrings(tree):
        for offset, text_line in enumerate(text.splitlines()):
            match = PER_SEED_FIGURES.search(text_line)
            if match:
                report(start + offset, "per-seed-figures", f"docstring quotes {match.group(0)!r}")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            match = PER_SEED_FIGURES.search(tok.string)
            if match:
                report(tok.start[0], "per-seed-figures", f"comment quotes {match.group(0)!r}")
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_follows_the_layout_rules(path):
    found = violations(path)
    assert not found, "\n".join(found)


def _check_snippet(tmp_path: Path, relpath: str, source: str) -> list[str]:
    """The violations of ``source`` as if it were the package file ``relpath``."""
    global ROOT, MODULES
    fake_root = tmp_path
    path = fake_root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    saved = ROOT, MODULES
    ROOT = fake_root
    MODULES = {**saved[1], _module_name(path): path}
    try:
        return [v.split(": ")[1] for v in violations(path)]
    finally:
        ROOT, MODULES = saved


@pytest.mark.parametrize(
    "relpath, source, rules",
    [
        ("pyro_flowguide/guides/x.py", "from .packing import _helper\n", ["private-import"]),
        ("pyro_flowguide/guides/x.py", "from pyro_flowguide.flows.registry import _f\n", ["private-import"]),
        ("pyro_flowguide/guides/x.py", "from .. import transforms\ntransforms._cache.clear()\n", ["private-import"]),
        ("pyro_flowguide/guides/x.py", "import pyro_flowguide.flows.registry as r\nr._g()\n", ["private-import"]),
        ("pyro_flowguide/guides/x.py", "def f():\n    from ..train import fit\n", ["train-import", "layer-order"]),
        ("pyro_flowguide/flows/x.py", "from ..guides import AutoFlowGuide\n", ["layer-order"]),
        ("pyro_flowguide/tracing.py", "from . import flows\n", ["layer-order"]),
        ("pyro_flowguide/diagnostics/x.py", "from ..guides import packing\nfrom .psis import Draws\n", []),
        ("pyro_flowguide/demo.py", "from .train import fit\nfrom .guides import stl\n", []),
        ("pyro_flowguide/guides/x.py", "x = 1\n" * 501, ["file-size"]),
        ("pyro_flowguide/guides/x.py", "class A:\n" + "    x = 1\n" * 300, ["class-size"]),
        ("pyro_flowguide/guides/x.py", '"""Summary.\n' + "text\n" * 30 + '"""\n', ["module-docstring"]),
        ("pyro_flowguide/guides/x.py", '"""Summary.\n' + "text\n" * 29 + '"""\n', []),
        ("pyro_flowguide/guides/x.py", "x = 1  # over seeds 0-11: 0.72 0.35\n", ["per-seed-figures"]),
        ("pyro_flowguide/guides/x.py", 'def f():\n    """k-hat 0.412 / 0.538."""\n', ["per-seed-figures"]),
    ],
)
def test_the_rules_catch_what_they_describe(tmp_path, relpath, source, rules):
    assert sorted(set(_check_snippet(tmp_path, relpath, source))) == sorted(rules)
