#!/usr/bin/env python3
"""The import layering of ctrl/, checked (run by `make lint`).

The allowed graph is written once, in docs/architecture.md: the table
between the `layers:begin` and `layers:end` markers says which packages
each package may import. Every import of every module under ctrl/ (at the
top or inside a function, absolute or relative) is resolved with `ast` and
checked against it; so is the rule that only ctrl.dataplane imports the
libraries that touch the kernel. Prints one line per import that breaks it
and exits 1, or exits 0.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_LIBRARIES = ("cffi", "pyroute2", "bcc")  # only ctrl.dataplane imports them
KERNEL_PACKAGE = "ctrl.dataplane"


def rules_from(doc: Path) -> dict[str, set[str]]:
    """package -> the packages it may import, from the doc's layer table."""
    text = doc.read_text()
    m = re.search(r"<!-- layers:begin -->(.*?)<!-- layers:end -->", text, re.S)
    if m is None:
        raise SystemExit(f"{doc}: no layer table between <!-- layers:begin --> and <!-- layers:end -->")
    rules: dict[str, set[str]] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue  # the header, its rule, blank lines
        rules[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[1]))
    if not rules:
        raise SystemExit(f"{doc}: the layer table has no rows")
    return rules


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:
                # `from . import x` or `from .. import x`: x may be a module.
                out.extend((node.lineno, f"{target}.{a.name}") for a in node.names)
            else:
                out.append((node.lineno, target))
    return out


def layer_of(module: str, rules: dict[str, set[str]]) -> str | None:
    """The package of the table a module belongs to (the longest match)."""
    best = None
    for pkg in rules:
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
            best = pkg
    return best


def violations(root: Path, rules: dict[str, set[str]], top: str = "ctrl") -> list[str]:
    """One line per import under root/top that the rules do not allow."""
    out = []
    for path in sorted((root / top).rglob("*.py")):
        mod = module_name(path, root)
        own = layer_of(mod, rules)
        if own is None:
            out.append(f"{path.relative_to(root)}: module {mod} belongs to no package of the layer table")
            continue
        for line, target in imports(path, root):
            where = f"{path.relative_to(root)}:{line}"
            first = target.split(".")[0]
            if first in KERNEL_LIBRARIES and own != KERNEL_PACKAGE:
                out.append(f"{where}: {own} imports {target}: only {KERNEL_PACKAGE} touches the kernel")
                continue
            if first != top:
                continue  # the standard library or a third-party package
            dep = layer_of(target, rules)
            if dep is None:
                out.append(f"{where}: {own} imports {target}, which belongs to no package of the layer table")
            elif dep != own and dep not in rules[own]:
                allowed = ", ".join(sorted(rules[own])) or "nothing of ctrl"
                out.append(f"{where}: {own} imports {target} ({dep}); it may import {allowed}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="the tree holding ctrl/ (default: this repository)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "architecture.md", help="where the layer table is")
    a = ap.parse_args(argv)
    bad = violations(a.root, rules_from(a.doc))
    for line in bad:
        print(line)
    if bad:
        print(f"check_layers: {len(bad)} imports break the layering of {a.doc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
