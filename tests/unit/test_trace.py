"""`sliceproxy trace` without a kernel: its flags, its filter as the tap's
#defines, events turned into lines, the Debian headers it finds, and the
one sentence it says when bcc or headers are missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ctrl.cli import main
from ctrl.cli.parser import build_parser
from ctrl.cli.trace import REASONS, Formatter, trace_filter, verdict_names
from ctrl.dataplane import abi
from ctrl.dataplane import trace as dtrace
from ctrl.util.addrs import addr16

VERDICTS = abi.verdicts()


@pytest.mark.parametrize(
    "given,want",
    [
        (["dnat"], {"dnat_new", "dnat_established"}),
        (["dnat-new"], {"dnat_new"}),
        (["DROP"], {v for v in VERDICTS if v.startswith("drop_")}),
        (["revnat,reject"], {"revnat", "reject_no_backend"}),
        (["snat", "unsnat"], {"snat", "unsnat"}),
        (None, set()),
    ],
    ids=["family", "dash", "upper-family", "comma", "repeated", "none-means-all"],
)
def test_verdict_names(given, want):
    assert verdict_names(given) == want


def test_default_verdicts_are_what_the_programs_did():
    f = trace_filter(args())
    assert f.verdicts == {v for v in VERDICTS if not v.startswith("pass_")}
    assert "dnat_new" in f.verdicts and "drop_source_range" in f.verdicts
    assert trace_filter(args("--verdict", "pass")).verdicts == {v for v in VERDICTS if v.startswith("pass_")}


def test_unknown_verdict_names_itself():
    with pytest.raises(ValueError, match="'accept'"):
        verdict_names(["dnat,accept"])


def args(*flags: str):
    return build_parser().parse_args(["trace", *flags])


@pytest.mark.parametrize(
    "flags,field,want",
    [
        (("--frontend", "198.19.0.10:80"), "frontend", (addr16("198.19.0.10"), 80)),
        (("--frontend", "[2001:db8::10]:443"), "frontend", (addr16("2001:db8::10"), 443)),
        (("--backend", "198.18.1.11"), "backend", addr16("198.18.1.11")),
        (("--service", "default/web"), "service", "default/web"),
        (("--rate", "7"), "rate", 7),
    ],
    ids=["frontend4", "frontend6", "backend", "service", "rate"],
)
def test_flags_make_the_filter(flags, field, want):
    assert getattr(trace_filter(args(*flags)), field) == want


@pytest.mark.parametrize(
    "flags,names",
    [
        (("--frontend", "198.19.0.10"), "--frontend"),
        (("--frontend", "198.19.0.10:0"), "--frontend"),
        (("--frontend", "web:80"), "--frontend"),
        (("--backend", "198.18.1.300"), "--backend"),
        (("--service", "web"), "--service"),
        (("--service", "default/web:http"), "--service"),
        (("--rate", "0"), "--rate"),
        (("--verdict", "nat"), "--verdict"),
    ],
    ids=["no-port", "port-0", "name", "bad-ip", "no-namespace", "a-port", "rate-0", "verdict"],
)
def test_bad_flags_are_named(flags, names, capsys):
    with pytest.raises(ValueError, match=names):
        trace_filter(args(*flags))
    # The command says it in one line and exits 2, before touching anything.
    assert main(["trace", *flags]) == 2
    assert names in capsys.readouterr().err


def test_every_drop_verdict_has_a_reason():
    """A drop verdict added to the header needs its reason here."""
    refusing = {v for v in VERDICTS if v.startswith(("drop_", "reject_"))}
    assert refusing and set(REASONS) == refusing


def test_verdict_mask_is_the_header_bits():
    f = dtrace.Filter(verdicts=frozenset({"dnat_new", "drop_source_range"}))
    assert f.verdict_mask() == (1 << abi.const("SP_V_DNAT_NEW")) | (1 << abi.const("SP_V_DROP_SOURCE_RANGE"))
    assert dtrace.Filter().verdict_mask() == (1 << abi.const("SP_V_MAX")) - 1


def test_prelude_bakes_the_filter_in():
    f = dtrace.Filter(service="default/web", frontend=(addr16("198.19.0.10"), 80), rate=100)
    text = dtrace.prelude("/sys/fs/bpf/x", f, ncpu=4)
    assert f'#define TAP_PIN_SVC "/sys/fs/bpf/x/{abi.map_name("sp_svc")}"' in text
    assert f'#define TAP_PIN_TRACE "/sys/fs/bpf/x/{abi.map_name("sp_trace")}"' in text
    # The Service's name up to the colon that ends it in sp_names, byte by byte.
    want = b"default/web:"
    assert "#define TAP_SVC_FILTER 1" in text
    assert " && ".join(f"(n)[{i}] == {b}" for i, b in enumerate(want)) in text
    assert "(port) == 80" in text
    assert "#define TAP_BACKEND_MATCH(w) 1" in text  # no --backend
    # 100 events/s over 4 CPUs: 25 each, one per 40 ms.
    assert "#define TAP_BURST 25" in text and "#define TAP_NS_PER_TOKEN 40000000ULL" in text
    plain = dtrace.prelude("/p", dtrace.Filter(), ncpu=64)
    assert "TAP_SVC_FILTER" not in plain and "#define TAP_FRONT_MATCH(w, port) 1" in plain
    assert "#define TAP_BURST 1" in plain  # never 0 tokens, whatever the CPU count


def event(verdict: str, **kw) -> dict:
    raw = abi.pack(
        "sp_trace_event",
        time=5_000_000_000,
        saddr=addr16(kw.get("src", "198.18.1.2")),
        daddr=addr16(kw.get("dst", "198.19.0.10")),
        sport=kw.get("sport", 40000),
        dport=kw.get("dport", 80),
        nat_saddr=addr16(kw["nat_src"]) if "nat_src" in kw else bytes(16),
        nat_daddr=addr16(kw["nat_dst"]) if "nat_dst" in kw else bytes(16),
        nat_sport=kw.get("nat_sport", 0),
        nat_dport=kw.get("nat_dport", 0),
        front_addr=addr16("198.19.0.10"),
        front_port=80,
        ifindex=1,
        svc_id=7,
        action=kw.get("action", 0),
        proto=6,
        hook=abi.const(kw.get("hook", "SP_TRACE_HOOK_POD_INGRESS")),
        verdict=abi.const(f"SP_V_{verdict.upper()}"),
    )
    return abi.unpack("sp_trace_event", raw)


def fmt() -> Formatter:
    return Formatter(
        lambda i: {7: "default/web:http/TCP"}.get(i), clock_offset=1_800_000_000.0, ifnames={1: "eth-pod"}.__getitem__
    )


def test_new_flow_record_names_service_and_backend():
    r = fmt().record(event("dnat_new", nat_src="198.18.1.2", nat_sport=40000, nat_dst="198.18.1.11", nat_dport=8080))
    assert r == {
        "time": "2027-01-15T08:00:05.000000+00:00",
        "interface": "eth-pod",
        "hook": "pod_ingress",
        "direction": "ingress",
        "proto": "TCP",
        "src": "198.18.1.2:40000",
        "dst": "198.19.0.10:80",
        "nat_src": "198.18.1.2:40000",
        "nat_dst": "198.18.1.11:8080",
        "service": "default/web:http/TCP",
        "frontend": "198.19.0.10:80",
        "backend": "198.18.1.11:8080",
        "verdict": "dnat_new",
        "action": "ok",
        "reason": None,
    }
    json.dumps(r)  # --json prints it as is
    line = Formatter.line(r)
    assert line.startswith("08:00:05.000000 pod_ingress ")
    assert "198.18.1.2:40000 > 198.19.0.10:80 => 198.18.1.2:40000 > 198.18.1.11:8080" in line
    assert line.endswith("default/web:http/TCP backend 198.18.1.11:8080 dnat_new")


def test_reply_backend_is_its_source():
    r = fmt().record(
        event(
            "revnat",
            src="198.18.1.11",
            sport=8080,
            dst="198.18.1.2",
            dport=40000,
            hook="SP_TRACE_HOOK_POD_EGRESS",
            nat_src="198.19.0.10",
            nat_sport=80,
            nat_dst="198.18.1.2",
            nat_dport=40000,
        )  # fmt: skip
    )
    assert (r["backend"], r["nat_src"], r["direction"]) == ("198.18.1.11:8080", "198.19.0.10:80", "egress")


def test_drop_record_says_why():
    r = fmt().record(event("drop_source_range", action=2))
    assert (r["nat_src"], r["nat_dst"], r["backend"], r["action"]) == (None, None, None, "shot")
    assert "loadBalancerSourceRanges" in r["reason"]
    assert Formatter.line(r).endswith("drop_source_range: " + r["reason"])


def fake_headers(root: Path, version: str) -> Path:
    """Debian's pair of directories for one kernel ABI."""
    common = root / f"linux-headers-{version}-common"
    arch = root / f"linux-headers-{version}-amd64"
    for d in (common / "include" / "linux", common / "arch/x86/include/asm", common / "arch/x86/include/uapi"):
        d.mkdir(parents=True)
    for d in (arch / "include" / "generated", arch / "include" / "config", arch / "arch/x86/include/generated"):
        d.mkdir(parents=True)
    (arch / "Makefile").write_text(f"include {common}/Makefile\n")
    return arch


def test_newest_debian_headers_are_picked(tmp_path):
    older = fake_headers(tmp_path, "6.1.0-9")
    newer = fake_headers(tmp_path, "6.1.0-57")
    (tmp_path / "linux-headers-6.1.0-60-common").mkdir()  # no arch package: unusable
    assert dtrace.debian_headers([str(older), str(newer), str(tmp_path / "linux-headers-6.1.0-60-common")]) == (
        str(newer),
        str(tmp_path / "linux-headers-6.1.0-57-common"),
    )
    assert dtrace.debian_headers([]) is None


def test_merged_tree_holds_both_halves(tmp_path):
    arch = fake_headers(tmp_path, "6.1.0-57")
    common = tmp_path / "linux-headers-6.1.0-57-common"
    tree = Path(dtrace.merged_kernel_tree(str(arch), str(common), str(tmp_path / "tree")))
    assert sorted(p.name for p in (tree / "include").iterdir()) == ["config", "generated", "linux"]
    assert sorted(p.name for p in (tree / "arch/x86/include").iterdir()) == ["asm", "generated", "uapi"]
    assert (tree / "include" / "linux").resolve() == common / "include" / "linux"


def test_no_headers_is_one_sentence_naming_the_package(monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(dtrace, "debian_headers", lambda: None)
    monkeypatch.setattr(dtrace, "running_kernel_headers", lambda release: False)
    with pytest.raises(dtrace.TraceUnavailable, match="install linux-headers-amd64"):
        dtrace.headers()
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/somewhere")
    assert dtrace.headers() is None  # the operator's tree: bcc is told nothing more


def test_missing_bcc_exits_2_saying_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc raises ImportError
    assert main(["trace", "--pin-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert "install python3-bpfcc" in err and len(err.splitlines()) == 1, err
