"""The import rules of ``layerstore/__init__.py``, checked on the source with ``ast``.

Every import counts, including those inside functions and ``if TYPE_CHECKING:`` blocks: a rule
that only holds at run time still lets a cycle or a wrong dependency into the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("layerstore", "auth", "stargz_store")
TOOLS = ("testbed", "tests", "benchmarks")
FOUNDATION = ("layerstore.errors", "layerstore.digest", "layerstore.source", "layerstore.common")
ASYNC_AND_FUSE = ("pyfuse3", "pyfuse3_asyncio", "trio")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def group(module: str) -> str:
    """The layer a module belongs to (``layerstore`` itself is a docstring: foundation)."""
    if module == "layerstore" or _within(module, FOUNDATION):
        return "foundation"
    for sub in ("estargz", "registry", "image", "runtime"):
        if _within(module, (f"layerstore.{sub}",)):
            return sub
    for top in ("auth", "stargz_store"):
        if _within(module, (top,)):
            return top
    if _within(module, TOOLS):
        return "tools"
    return "external"


# group -> the groups it may import (besides itself and the outside world)
ALLOWED = {
    "foundation": {"foundation"},
    "estargz": {"foundation"},
    "registry": {"foundation", "auth"},  # plus layerstore.estargz.constants, below
    "image": {"foundation", "estargz", "registry"},
    "runtime": {"foundation", "estargz", "registry"},
    "auth": {"foundation"},
    "stargz_store": {"foundation", "estargz", "registry", "image", "runtime", "auth"},
}


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in *tree*; ``from P import N`` names ``P.N`` when that is
    a module of this repository, else ``P``. Relative imports are resolved against *module*."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if _is_repo_module(candidate):
                    yield node.lineno, candidate
                else:
                    yield node.lineno, target


def _is_repo_module(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """The broken rules of one module's *source*, one readable line each."""
    src = group(module)
    out: list[str] = []
    for line, target in imported_modules(ast.parse(source), module, is_package):
        dst = group(target)
        where = f"{module}:{line} imports {target}"
        if dst == "tools":
            out.append(f"{where}: test and demo tooling is not part of the product")
        elif dst == "external":
            if src not in ("stargz_store", "tools") and _within(target, ASYNC_AND_FUSE):
                out.append(f"{where}: layerstore and auth know nothing of FUSE or trio")
        elif dst != src and dst not in ALLOWED[src]:
            if src == "registry" and target == "layerstore.estargz.constants":
                continue
            out.append(f"{where}: {src} may not import {dst}")
    return out


def product_modules() -> Iterator[tuple[str, Path]]:
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def test_product_modules_follow_the_import_rules() -> None:
    found = list(product_modules())
    assert len(found) > 40  # the walk found the tree
    problems: list[str] = []
    for module, path in found:
        problems += violations(
            module, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py"
        )
    assert problems == [], "\n".join(problems)


def test_subpackages_say_what_they_own() -> None:
    subpackages = ("common", "estargz", "registry", "runtime", "image")
    for pkg in ("layerstore", "auth", "stargz_store", *(f"layerstore/{s}" for s in subpackages)):
        doc = ast.get_docstring(ast.parse((REPO / pkg / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{pkg}/__init__.py has no docstring with its rules"


# --- the checker itself can fail ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("layerstore.digest", "from layerstore.estargz import toc", "foundation may not import"),
        ("layerstore.common.redact", "import auth.types", "foundation may not import auth"),
        ("layerstore.estargz.toc", "from layerstore.registry import manifest", "estargz may"),
        ("layerstore.estargz.reader", "from ..runtime.cache import ChunkCache", "estargz may"),
        ("layerstore.registry.manifest", "from layerstore.estargz.toc import X", "registry may"),
        ("layerstore.image.convert", "from layerstore.runtime import layer", "image may not"),
        ("layerstore.runtime.layer", "import layerstore.image.convert", "runtime may not"),
        ("auth.token", "from layerstore.registry.client import RegistryClient", "auth may"),
        ("layerstore.runtime.fetcher", "import trio", "FUSE or trio"),
        ("auth.store", "from pyfuse3 import Operations", "FUSE or trio"),
        ("stargz_store.daemon", "from testbed import LoopbackRegistry", "tooling"),
        ("layerstore.image.ocilayout", "def f():\n    import tests.image_util", "tooling"),
    ],
)
def test_checker_flags(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("layerstore.registry.manifest", "from layerstore.estargz.constants import X"),
        ("layerstore.registry.manifest", "from layerstore.estargz import constants"),
        ("layerstore.registry.client", "from auth import token"),
        ("layerstore.image.convert", "from layerstore.estargz.writer import write_estargz"),
        ("layerstore.runtime.manager", "from layerstore.registry.client import PullSource"),
        ("layerstore.estargz.tocbuild", "from .toc import TOCIndex\nimport json"),
        ("layerstore.common.atomicfile", "from layerstore.errors import LayerStoreError"),
        ("stargz_store.fusefs", "import pyfuse3, trio\nfrom layerstore.runtime import manager"),
    ],
)
def test_checker_allows(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_relative_imports_are_resolved() -> None:
    tree = ast.parse("from . import toc\nfrom ..registry import manifest\nfrom .. import digest")
    got = [m for _, m in imported_modules(tree, "layerstore.estargz.reader", False)]
    assert got == ["layerstore.estargz.toc", "layerstore.registry.manifest", "layerstore.digest"]
    tree = ast.parse("from .constants import X")
    got = [m for _, m in imported_modules(tree, "layerstore.estargz", True)]
    assert got == ["layerstore.estargz.constants"]


def test_group_of_the_standard_library_is_external() -> None:
    assert {group(m) for m in ("json", "os.path", "structlog", "layerstorex")} == {"external"}
