"""`sliceproxy trace`: live flows through the dataplane, one line per event
(docs/inspecting.md, "Live flows").

The kernel side (the bcc tap, the ring buffer) is ctrl.dataplane.trace;
this module turns the flags into its Filter, events into lines, and makes
sure the tap is detached however the command ends: at --count, on Ctrl-C,
SIGTERM or SIGHUP, or on an error. After a SIGKILL the next `trace` (or
`uninstall`) removes what it left.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..dataplane import abi
from ..dataplane.libbpf import BPFError
from ..dataplane.maps import Map
from ..model.plan import PROTO_NAMES
from ..util.addrs import addr16, hostport
from .parser import globs

# Why a packet was dropped or refused, by verdict (enum sp_verdict in
# ebpf/sliceproxy.h says the same for each).
REASONS = {
    "drop_no_backend": "no backend on this node for it (a Local traffic policy with no local endpoint)",
    "drop_error": "the maps disagree, or a rewrite failed",
    "drop_source_range": "source outside the Service's loadBalancerSourceRanges",
    "drop_snat": "no node address or no free SNAT port to masquerade it",
    "reject_no_backend": "the Service has no endpoint: answered with an ICMP port unreachable",
}

# tc actions (linux/pkt_cls.h) our programs return.
ACTIONS = {0: "ok", 2: "shot", 7: "redirect"}

POLL_MS = 100
REFRESH_SECONDS = 1.0


def _hooks() -> dict[int, str]:
    prefix = "SP_TRACE_HOOK_"
    return {abi.const(n): n[len(prefix) :].lower() for n in abi.constants_with_prefix(prefix)}


def verdict_names(values: list[str] | None) -> frozenset[str]:
    """--verdict values: a verdict of enum sp_verdict (dnat_new) or a
    family of them (dnat: dnat_new and dnat_established; drop: every
    drop_*). ValueError naming the bad one."""
    names = abi.verdicts()
    out: set[str] = set()
    for v in globs(values):
        v = v.lower().replace("-", "_")
        hit = {n for n in names if n == v or n.startswith(v + "_")}
        if not hit:
            families = sorted({n.split("_")[0] for n in names})
            raise ValueError(f"--verdict {v!r} is none of {', '.join(names)} nor a family ({', '.join(families)})")
        out |= hit
    return frozenset(out)


def _frontend(value: str) -> tuple[bytes, int]:
    """IP:PORT, or [IPv6]:PORT."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
        return addr16(str(ipaddress.ip_address(host))), int(port)
    except ValueError:
        raise ValueError(f"--frontend {value!r} is not IP:PORT (an IPv6 address in brackets)") from None


def trace_filter(args: argparse.Namespace) -> Any:
    """The flags as a ctrl.dataplane.trace.Filter; ValueError naming the bad flag."""
    from ..dataplane.trace import Filter

    if args.service is not None and (args.service.count("/") != 1 or ":" in args.service):
        raise ValueError(f"--service {args.service!r} is not NAMESPACE/NAME")
    if args.rate < 1:
        raise ValueError(f"--rate {args.rate} is not a positive number of events per second")
    backend = None
    if args.backend is not None:
        try:
            backend = addr16(str(ipaddress.ip_address(args.backend)))
        except ValueError:
            raise ValueError(f"--backend {args.backend!r} is not an IP address") from None
    return Filter(
        service=args.service,
        frontend=_frontend(args.frontend) if args.frontend is not None else None,
        backend=backend,
        # By default what the programs did to a Service's packets; the
        # pass_* verdicts (a reply crossing the backend's own interface,
        # where nothing is done to it) only when asked for.
        verdicts=verdict_names(args.verdict) or frozenset(v for v in abi.verdicts() if not v.startswith("pass_")),
        rate=args.rate,
    )


def backend_of(verdict: str, ev: dict[str, Any]) -> tuple[bytes, int] | None:
    """The backend an event's packet goes to or comes from, by its verdict:
    a DNATed packet's new destination, a reply's source, a masqueraded
    packet's destination (after its DNAT)."""
    if verdict.startswith("dnat_"):
        return ev["nat_daddr"], ev["nat_dport"]
    if verdict in ("revnat", "unsnat"):
        return ev["saddr"], ev["sport"]
    if verdict == "snat":
        return ev["daddr"], ev["dport"]
    return None


class Formatter:
    """Raw events (abi.unpack of struct sp_trace_event) -> records, with
    the service named from sp_names and the interface by its name."""

    def __init__(
        self,
        names: Callable[[int], str | None],
        clock_offset: float | None = None,
        ifnames: Callable[[int], str] = socket.if_indextoname,
    ) -> None:
        self.names = names
        self._if_indextoname = ifnames
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: wall time = it + offset.
        self.offset = time.time() - time.monotonic() if clock_offset is None else clock_offset
        self.verdicts = abi.verdicts()
        self.hooks = _hooks()
        self._ifnames: dict[int, str] = {}

    def ifname(self, idx: int) -> str:
        if idx not in self._ifnames:
            try:
                self._ifnames[idx] = self._if_indextoname(idx)
            except OSError:
                return f"if{idx}"  # gone already: not cached, the index may come back
        return self._ifnames[idx]

    def record(self, ev: dict[str, Any]) -> dict[str, Any]:
        v = ev["verdict"]
        verdict = self.verdicts[v] if v < len(self.verdicts) else str(v)
        hook = self.hooks.get(ev["hook"], str(ev["hook"]))
        be = backend_of(verdict, ev)
        translated = any(ev["nat_saddr"]) or any(ev["nat_daddr"])
        return {
            "time": datetime.fromtimestamp(ev["time"] / 1e9 + self.offset, UTC).isoformat(timespec="microseconds"),
            "interface": self.ifname(ev["ifindex"]),
            "hook": hook,
            "direction": hook.rsplit("_", 1)[-1],
            "proto": PROTO_NAMES.get(ev["proto"], str(ev["proto"])),
            "src": hostport(ev["saddr"], ev["sport"]),
            "dst": hostport(ev["daddr"], ev["dport"]),
            "nat_src": hostport(ev["nat_saddr"], ev["nat_sport"]) if translated else None,
            "nat_dst": hostport(ev["nat_daddr"], ev["nat_dport"]) if translated else None,
            "service": self.names(ev["svc_id"]) if ev["svc_id"] else None,
            "frontend": hostport(ev["front_addr"], ev["front_port"]) if ev["front_port"] else None,
            "backend": hostport(*be) if be else None,
            "verdict": verdict,
            "action": ACTIONS.get(ev["action"], str(ev["action"])),
            "reason": REASONS.get(verdict),
        }

    @staticmethod
    def line(r: dict[str, Any]) -> str:
        """One readable line: time, hook, interface, the packet before and
        (=>) after the program, the service, the backend, the verdict."""
        changed = r["nat_src"] and (r["nat_src"], r["nat_dst"]) != (r["src"], r["dst"])
        after = f" => {r['nat_src']} > {r['nat_dst']}" if changed else ""
        parts = [
            r["time"][11:26],
            f"{r['hook']:<11}",
            r["interface"],
            r["proto"],
            f"{r['src']} > {r['dst']}{after}",
            r["service"] or "-",
        ]
        if r["backend"]:
            parts.append(f"backend {r['backend']}")
        parts.append(r["verdict"] + (f": {r['reason']}" if r["reason"] else ""))
        return " ".join(parts)


class _Names:
    """svc_id -> "namespace/name:port/PROTO" from the pinned sp_names,
    read again on a miss (a Service created while the trace runs)."""

    def __init__(self, m: Map | None) -> None:
        self.map = m
        self.cache: dict[int, str] = {}

    def __call__(self, svc_id: int) -> str | None:
        if svc_id not in self.cache and self.map is not None:
            raw = self.map.lookup(abi.u32(svc_id))
            if raw is None:
                return f"id {svc_id}"
            name = abi.unpack("sp_svc_name", raw)["name"].split(b"\0", 1)[0].decode(errors="replace")
            self.cache[svc_id] = name
        return self.cache.get(svc_id, f"id {svc_id}")


class _Stop(Exception):
    pass


def cmd_trace(args: argparse.Namespace) -> int:
    from ..dataplane import trace as dtrace

    def say(msg: str) -> None:
        print(f"sliceproxy trace: {msg}", file=sys.stderr, flush=True)

    try:
        filt = trace_filter(args)
    except ValueError as e:
        say(str(e))
        return 2
    try:
        dtrace.check_tools()
    except dtrace.TraceUnavailable as e:
        say(str(e))
        return 2
    patterns = globs(args.interfaces) or ["*"]
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    names_path = f"{args.pin_dir}/{abi.map_name('sp_names')}"
    try:
        names_map = Map.open_pinned(names_path)
    except BPFError as e:
        say(f"no sliceproxy maps pinned in {args.pin_dir} ({e.strerror}): is the agent running there?")
        return 1
    fmt = Formatter(_Names(names_map))
    shown = 0
    out = sys.stdout

    def on_event(ev: dict[str, Any]) -> None:
        nonlocal shown
        if args.count and shown >= args.count:
            raise _Stop
        r = fmt.record(ev)
        if filt.backend is not None:
            # The tap skips flows whose backend it knows; a new flow's is
            # known only once our program picked it: filtered here.
            be = backend_of(r["verdict"], ev)
            if be is None or be[0] != filt.backend:
                return
        out.write((json.dumps(r) if args.json else Formatter.line(r)) + "\n")
        out.flush()
        shown += 1
        if args.count and shown >= args.count:
            raise _Stop

    t = dtrace.Trace(args.pin_dir, patterns, filt)
    try:
        try:
            t.start(on_event)
        except dtrace.TraceUnavailable as e:
            say(str(e))
            return 2
        if t.leftovers:
            say(f"removed {t.leftovers} taps a killed trace had left")
        ifaces = sorted({h.ifname for h in t.hooks})
        say(
            f"tapping {len(t.hooks)} hooks on {len(ifaces)} interfaces of {args.pin_dir} "
            f"(at most {filt.rate} events/s); Ctrl-C stops"
        )
        last_refresh = time.monotonic()
        reported = dtrace.Counts()
        while not stop["signal"]:
            try:
                t.poll(POLL_MS)
            except _Stop:
                break
            if time.monotonic() - last_refresh >= REFRESH_SECONDS:
                last_refresh = time.monotonic()
                for h in t.refresh():
                    say(f"tapping {h.ifname} (new)")
                c = t.counts()
                if (c.limited, c.lost) != (reported.limited, reported.lost):
                    say(f"{c.limited} events over --rate not shown, {c.lost} lost (ring buffer full) so far")
                    reported = c
        # What arrived before the stop is shown, not left in the buffer.
        with contextlib.suppress(_Stop):
            t.poll(0)
        c = t.counts()
        say(f"{shown} events shown; {c.limited} over --rate, {c.lost} lost (ring buffer full)")
        return 0
    except BrokenPipeError:
        return 0  # piped into head: stopped reading
    finally:
        t.close()
        names_map.close()
