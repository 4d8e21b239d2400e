"""The Grafana dashboard charts metrics the agent really exports."""

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from ctrl.runtime.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

# Exported at scrape time by DataplaneCollector, from the kernel maps.
DATAPLANE = {
    "sliceproxy_packets_total",
    "sliceproxy_bytes_total",
    "sliceproxy_map_entries",
    "sliceproxy_map_capacity",
    "sliceproxy_conntrack_entries",
}


def test_every_dashboard_metric_is_exported():
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:kubeproxy|sliceproxy)_[a-z_]+)", e)}
    m = Metrics()
    m.healthz.labels(code="200").inc()
    exported = set(re.findall(r"^([a-z_]+)(?:\{| )", generate_latest(m.registry).decode(), re.M)) | DATAPLANE
    assert used and used <= exported, sorted(used - exported)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_metrics_doc_lists_every_exported_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    m = Metrics()
    m.healthz.labels(code="200").inc()
    text = generate_latest(m.registry).decode()
    names = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in re.findall(r"^([a-z_]+)(?:\{| )", text, re.M)}
    # Labelled metrics with no series yet show in their TYPE line only.
    names |= set(re.findall(r"^# TYPE ([a-z_]+) ", text, re.M))
    names = {n for n in names if not n.endswith("_created")} | DATAPLANE
    missing = [n for n in sorted(names) if n not in doc]
    assert not missing, missing


def test_every_verdict_is_named_in_metrics_doc():
    from ctrl.dataplane.abi import verdicts

    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [v for v in verdicts() if f"`{v}`" not in doc]
    assert not missing, f"docs/metrics.md does not name the verdicts {missing}"
