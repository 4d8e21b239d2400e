"""Kubernetes' own Service e2e tests (e2e.test of the pinned module) against
test nodes running sliceproxy, or kube-proxy built from the same module.

    python -m tests.node.e2e_run --proxy sliceproxy --nodes 2 --list tests/node/e2e-list.txt --report build/e2e-sp
    python -m tests.node.e2e_run --proxy kube-proxy ...

It starts the control plane, the LAN and the kubelet nodes of
tests/node/kubenode.py (each in a network namespace of its own), deploys the
proxy (sliceproxy: the repository's DaemonSet from the image; kube-proxy:
the binary in iptables mode, one per node inside the node's namespace), runs
e2e.test focused on exactly the tests named in the list, and writes
``results.json`` (test name -> passed / failed / skipped, with the failure
message) and e2e.test's JUnit report into the report directory. Everything
is torn down at the end, also on failure or Ctrl-C. `make e2e` runs it for
both proxies; docs/conformance.md tabulates the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from scripts.harness.topo import exit_on_signals

from .images import image
from .kubenode import KubeNode, NodeCluster, node_bin

REPO = Path(__file__).resolve().parents[2]

# Go's regexp (RE2) metacharacters; anything else in a test name is literal.
_RE2_META = re.compile(r"([\\.+*?()|\[\]{}^$])")


def read_list(path: Path) -> list[str]:
    """Test names, one a line; '#' starts a comment."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def focus_regex(names: list[str]) -> str:
    # Not anchored: Ginkgo matches the focus against a text that does not
    # start with the name as listed, and a few upstream names end in a space
    # that a list file does not keep.
    return "(" + "|".join(_RE2_META.sub(r"\\\1", n) for n in names) + ")"


def start_kube_proxy(cluster: NodeCluster, node: KubeNode) -> None:
    """kube-proxy (iptables mode) as a process inside the node's namespace
    and cgroup, with settings that touch only that namespace: conntrack
    table sizing is machine-wide, so it is left alone."""
    node._spawn(
        "kube-proxy",
        [
            str(node_bin("kube-proxy")),
            f"--kubeconfig={node.dir / 'kubelet.kubeconfig'}",
            f"--hostname-override={node.name}",
            "--proxy-mode=iptables",
            "--cluster-cidr=198.18.64.0/18",
            "--nodeport-addresses=198.18.10.0/24",
            "--healthz-bind-address=0.0.0.0:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--v=2",
        ],
    )


def parse_junit(path: Path) -> dict[str, dict[str, str]]:
    results: dict[str, dict[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        # Ginkgo's report names each spec "[It] <full text>"; suite
        # set-up nodes are reported too, with other prefixes.
        if not name.startswith("[It] "):
            continue
        name = name[len("[It] ") :].strip()
        failure = case.find("failure")
        error = case.find("error")
        if case.find("skipped") is not None:
            results[name] = {"status": "skipped", "message": (case.find("skipped").get("message") or "")[:500]}  # type: ignore[union-attr]
        elif failure is not None or error is not None:
            el = failure if failure is not None else error
            assert el is not None
            results[name] = {"status": "failed", "message": ((el.get("message") or "") + "\n" + (el.text or ""))[:2000]}
        else:
            results[name] = {"status": "passed", "message": ""}
    return results


def run_e2e(cluster: NodeCluster, names: list[str], report: Path, timeout: float) -> dict[str, dict[str, str]]:
    report.mkdir(parents=True, exist_ok=True)
    argv = [
        str(node_bin("e2e.test")),
        f"--kubeconfig={cluster.cp.kubeconfig}",
        # The kubectl of the same release, not whatever is on PATH.
        f"--kubectl-path={node_bin('kubectl')}",
        "--provider=skeleton",
        f"--report-dir={report}",
        f"--num-nodes={len(cluster.nodes)}",
        f"--ginkgo.focus={focus_regex(names)}",
        f"--ginkgo.timeout={int(timeout)}s",
        # One order for every run: two runs cut short at the same point
        # (Ctrl-C: Ginkgo still writes the report) cover the same tests.
        "--ginkgo.seed=1",
        "--ginkgo.no-color",
        "--ginkgo.v",
        "--e2e-verify-service-account=false",
        "--dump-logs-on-failure=false",
        "--minStartupPods=0",
    ]
    log = report / "e2e.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        cp = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=cluster.cp._env(), timeout=timeout + 600)
    junit = sorted(report.glob("junit*.xml"))
    if not junit:
        raise SystemExit(f"e2e.test exited {cp.returncode} without a JUnit report; see {log}")
    # The report lists every spec of the suite; keep the ones asked for.
    wanted = set(names)
    results = {k: v for k, v in parse_junit(junit[0]).items() if k in wanted}
    for n in names:
        results.setdefault(n, {"status": "not run", "message": "not in e2e.test's report (name not found?)"})
    (report / "results.json").write_text(
        json.dumps(
            {"seconds": round(time.monotonic() - t0), "exit": cp.returncode, "results": results},
            indent=1,
            sort_keys=True,
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", choices=("sliceproxy", "kube-proxy"), default="sliceproxy")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--list", type=Path, default=REPO / "tests" / "node" / "e2e-list.txt")
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds for the whole e2e.test run")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, containers, BPF)")
    exit_on_signals()
    names = read_list(args.list)
    cluster = NodeCluster(nodes=args.nodes)
    try:
        # Every image the listed tests run; nothing can be pulled.
        cluster.start(["sliceproxy", "agnhost", "busybox", "regression"])
        if args.proxy == "sliceproxy":
            cluster.deploy_sliceproxy(image("sliceproxy").ref)
            cluster.wait_agents_ready()
        else:
            for node in cluster.nodes:
                start_kube_proxy(cluster, node)
        results = run_e2e(cluster, names, args.report, args.timeout)
    finally:
        cluster.stop()
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{args.proxy}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for name, r in sorted(results.items()):
        print(f"  {r['status']:8} {name}")
    return 0 if counts.get("failed", 0) == 0 and counts.get("not run", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
