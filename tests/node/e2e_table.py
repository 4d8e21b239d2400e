"""The side-by-side table of docs/conformance.md from two e2e_run reports.

    python -m tests.node.e2e_table build/e2e-sliceproxy build/e2e-kube-proxy

prints one Markdown row per test of either report (sliceproxy's result,
kube-proxy's), then the counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARK = {"passed": "pass", "failed": "FAIL", "skipped": "skipped", "not run": "not run"}


def load(report: Path) -> dict[str, dict[str, str]]:
    doc = json.loads((report / "results.json").read_text())
    results: dict[str, dict[str, str]] = doc["results"]
    return results


def main(argv: list[str]) -> int:
    ours, theirs = load(Path(argv[1])), load(Path(argv[2]))
    names = sorted(set(ours) | set(theirs))
    print("| test | sliceproxy | kube-proxy |")
    print("| --- | --- | --- |")
    for n in names:
        a = MARK.get(ours.get(n, {}).get("status", "not run"), "?")
        b = MARK.get(theirs.get(n, {}).get("status", "not run"), "?")
        print(f"| {n.replace('|', '/')} | {a} | {b} |")
    print()
    for label, res in (("sliceproxy", ours), ("kube-proxy", theirs)):
        counts: dict[str, int] = {}
        for r in res.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"- {label}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
