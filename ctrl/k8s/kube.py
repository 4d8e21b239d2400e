"""The Kubernetes API as the source: list, then watch, raw JSON.

One thread per resource (Services, EndpointSlices, this node's Node) lists
it, then watches from the list's resourceVersion with bookmarks. On 410
Gone (the resourceVersion is too old) it lists again and reports the
difference with what it had (deletes for what vanished), so the maps are
reconciled by diff, never flushed. On a dropped connection or an error it
backs off (0.5 s doubling to 30 s, with jitter) and resumes the watch from
the last resourceVersion it saw.

`synced` turns true once every resource has been listed completely: the
agent prunes nothing before that, so a restart or a reconnect never drops
traffic.

Responses are decoded with msgspec: EndpointSlice and Service list pages
and EndpointSlice watch events straight into ctrl.k8s.objects
(ctrl.k8s.slicejson) when they are clean, everything else into dicts for
ctrl.k8s.objects.parse; never with the kubernetes client's model classes
(seconds on 100,000 endpoints). The client package is used only to read a
kubeconfig or the in-cluster config.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import repeat
from types import MappingProxyType
from typing import Any

import msgspec
import urllib3

from ..util.gcpause import paused_gc
from .events import Event
from .objects import (
    SERVICE_NAME_LABEL,
    SUBSET_ALL,
    SUBSET_LABEL,
    EndpointSlice,
    Node,
    ObjectError,
    Service,
    describe,
    parse,
    problem_line,
    short,
)
from .slicejson import Page, decode_change, decode_page, decode_service_page, decode_trimmed_list

log = logging.getLogger("sliceproxy.source.kube")

# kube-proxy's selector: Services handed to another proxy, and headless
# ones, are not ours; the API server filters them out for us.
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

LIST_PAGE = 500
WATCH_TIMEOUT = 300  # seconds the server keeps one watch open
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


# The original slices: the EndpointSlice controller's (and any other
# manager's) for a Service, never the subset slices, which carry no
# service-name label (docs/subsetting.md).
ORIGINALS_SELECTOR = f"{SERVICE_NAME_LABEL},{PROXY_SELECTOR}"
SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"


def subsets_selector(zone: str) -> str:
    """The subset slices an agent in `zone` reads: its zone's and `all`."""
    return f"{SUBSET_LABEL} in ({zone},{SUBSET_ALL})"


@dataclass
class Resource:
    kind: str
    path: str  # collection path
    label_selector: str | None = None
    field_selector: str | None = None
    # Names one of several resources of one kind (the subsetter watches
    # original and subset slices apart); the kind when empty.
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.kind


def resources(node_name: str) -> list[Resource]:
    return [
        Resource("Service", "/api/v1/services", PROXY_SELECTOR),
        Resource("EndpointSlice", SLICES_PATH, ORIGINALS_SELECTOR),
        Resource("Node", "/api/v1/nodes", field_selector=f"metadata.name={node_name}"),
    ]


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """Just enough of an API client: GET with auth, JSON, streamed watches."""

    def __init__(
        self,
        server: str,
        ca_file: str | None,
        token: str | None = None,
        token_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify: bool = True,
    ):
        self.server = server.rstrip("/")
        self.token = token
        self.token_file = token_file
        kw: dict[str, object] = {}
        if verify:
            kw["cert_reqs"] = ssl.CERT_REQUIRED
            if ca_file:
                kw["ca_certs"] = ca_file
        else:
            kw["cert_reqs"] = ssl.CERT_NONE
        if cert_file:
            kw["cert_file"] = cert_file
            kw["key_file"] = key_file
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=4, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, kubeconfig: str | None, server: str | None = None) -> Client:
        """From a kubeconfig file, or the in-cluster ServiceAccount when None
        (then at `server` if given, instead of the `kubernetes` Service)."""
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        cfg = kclient.Configuration()
        if kubeconfig:
            kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            token_file = None
        else:
            kconfig.load_incluster_config(client_configuration=cfg)
            token_file = IN_CLUSTER_TOKEN  # rotated by the kubelet: re-read it
            if server:
                cfg.host = server
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        token = auth.split(" ", 1)[1] if auth and " " in auth else auth
        return cls(
            cfg.host,
            cfg.ssl_ca_cert,
            token=token,
            token_file=token_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            verify=cfg.verify_ssl,
        )

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "sliceproxy"}
        tok = self.token
        if self.token_file:
            try:
                with open(self.token_file) as f:
                    tok = f.read().strip()
            except OSError:
                pass
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        return h

    def url(self, path: str, **params) -> str:
        q = {k: v for k, v in params.items() if v is not None}
        return self.server + path + ("?" + urllib.parse.urlencode(q) if q else "")

    def get_json(self, path: str, timeout: float = 60, **params: Any) -> dict:
        return _loads(self.get_bytes(path, timeout, **params))

    def send(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """One write (POST, PUT, DELETE...) with a JSON body: the status and
        the decoded answer (None when it is not JSON)."""
        headers = self._headers()
        data = None
        if body is not None:
            data = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json"
        r = self.pool.request(
            method,
            self.url(path),
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=5, read=timeout),
            retries=False,
        )
        try:
            doc = _loads(r.data) if r.data else None
        except ValueError:
            doc = None
        return r.status, doc

    def get_bytes(self, path: str, timeout: float = 60, **params: Any) -> bytes:
        """The body of a GET that answered 200; APIError otherwise."""
        r = self.pool.request(
            "GET",
            self.url(path, **params),
            headers=self._headers(),
            timeout=urllib3.Timeout(connect=5, read=timeout),
            retries=False,
        )
        body = r.data
        if r.status != 200:
            raise APIError(r.status, _status_message(body))
        return body

    def stream(self, path: str, read_timeout: float, on_open=None, **params):
        """Yield each line of a watch response (one JSON event each).
        on_open(response), when given, gets the response first: calling
        its shutdown() from another thread ends the stream."""
        r = self.pool.request(
            "GET",
            self.url(path, **params),
            headers=self._headers(),
            preload_content=False,
            timeout=urllib3.Timeout(connect=5, read=read_timeout),
            retries=False,
        )
        if on_open is not None:
            on_open(r)
        try:
            if r.status != 200:
                raise APIError(r.status, _status_message(r.read()))
            buf = b""
            for chunk in r.stream(65536):
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        yield line
        finally:
            r.release_conn()


def _loads(body: bytes) -> Any:
    """JSON to dicts and lists (msgspec: C, faster than the stdlib's)."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise ValueError(f"invalid JSON from the API server: {_one_line(e)}") from None
    except RecursionError:  # msgspec stops at the interpreter's recursion limit
        raise ValueError("invalid JSON from the API server: nested too deep") from None


def _loads_object(body: bytes, what: str) -> dict:
    """A response or watch event that must be a JSON object."""
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"{what} from the API server is not a JSON object: {short(doc)}")
    return doc


def _status_message(body: bytes) -> str:
    try:
        msg = _loads(body).get("message")
    except (ValueError, AttributeError):
        msg = None
    return _one_line(msg) if isinstance(msg, str) and msg else body[:200].decode(errors="replace")


class KubeconfigError(Exception):
    pass


def kubeconfig_server(path: str) -> str:
    """The server URL of the current context's cluster in kubeconfig `path`
    (the kubelet's: the API server's own address, which a node reaches
    without any Service proxy). Raises KubeconfigError naming the field."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise KubeconfigError(f"{path}: {_one_line(e)}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig (a mapping)")
    clusters = {c.get("name"): c.get("cluster") for c in doc.get("clusters") or [] if isinstance(c, dict)}
    contexts = {c.get("name"): c.get("context") for c in doc.get("contexts") or [] if isinstance(c, dict)}
    current = doc.get("current-context")
    if current:
        ctx = contexts.get(current)
        if not isinstance(ctx, dict):
            raise KubeconfigError(f"{path}: current-context {current!r} is not among contexts")
        name = ctx.get("cluster")
        cluster = clusters.get(name)
        where = f"clusters[{name!r}].cluster.server"
    elif len(clusters) == 1:
        cluster = next(iter(clusters.values()))
        where = "clusters[0].cluster.server"
    else:
        raise KubeconfigError(f"{path}: no current-context, and not exactly one cluster")
    server = cluster.get("server") if isinstance(cluster, dict) else None
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeconfigError(f"{path}: {where}: {server!r} is not an https:// URL")
    return server


class GoneError(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KubeSource:
    """Events from the API server; same interface as FileSource."""

    def __init__(
        self,
        client: Client,
        node_name: str,
        backoff_max: float = 30.0,
        watched: list[Resource] | None = None,
    ):
        self.client = client
        self.node_name = node_name
        self.events: queue.Queue[list[Event]] = queue.Queue()
        self.backoff_max = backoff_max
        # The agent's three resources, or what another consumer (the
        # subsetter) watches; each named by Resource.key.
        self._resources = watched if watched is not None else resources(node_name)
        self._by_kind = {r.key: r for r in self._resources}
        # Per resource: the objects held (key -> parsed object) and the
        # resourceVersion to watch from (None: list first).
        self._known: dict[str, dict[str, object]] = {r.key: {} for r in self._resources}
        self._rv: dict[str, str | None] = {r.key: None for r in self._resources}
        self._listed: set[str] = set()
        # Selector switches (set_selector): a generation per resource, the
        # open watch response to cut, and the resources waiting for their
        # first selector (gate) before they list.
        self._gen: dict[str, int] = {r.key: 0 for r in self._resources}
        self._open: dict[str, Any] = {}
        self._switched: set[str] = set()
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.relists = 0  # 410 Gone handled, for tests and metrics
        self.slice_mode: Any = None  # ctrl.k8s.slicemode.SliceMode, when the agent chooses its slices
        self.reconnects = 0

    @property
    def synced(self) -> bool:
        return len(self._listed) == len(self._resources)

    def listed(self, kind: str) -> bool:
        """Whether `kind` has been listed completely once."""
        return kind in self._listed

    def gate(self, kind: str) -> None:
        """Before start(): `kind` lists nothing until set_selector gives
        it its selector (the agent's slices wait for the subset mode)."""
        self._gates[kind] = threading.Event()

    def selector(self, kind: str) -> str | None:
        return self._by_kind[kind].label_selector

    def set_selector(self, kind: str, selector: str) -> None:
        """Watch `kind` with another label selector from now on: its watch
        is cut, and it lists again with the new selector. That list goes to
        the queue as one batch (upserts for what the selector now matches,
        deletes for what only the old one did), so a consumer taking it
        whole never sees a mix of the two sets (docs/subsetting.md)."""
        with self._lock:
            res = self._by_kind[kind]
            gate = self._gates.get(kind)
            if res.label_selector == selector and (gate is None or gate.is_set()):
                return
            res.label_selector = selector
            self._gen[kind] += 1
            self._switched.add(kind)
            r = self._open.get(kind)
        if gate is not None:
            gate.set()
        if r is not None:
            try:
                r.shutdown()
            except Exception:  # already closed: the watch ends anyway
                pass

    def start(self) -> None:
        for res in self._resources:
            t = threading.Thread(target=self._run, args=(res,), name=f"watch-{res.key}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.synced:
            if self._stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.05)
        return True

    # -- one resource ------------------------------------------------------
    def list_all(self, kind: str) -> str:
        """List every object of `kind` ("Service", "EndpointSlice", "Node"),
        page by page: queue an upsert for each and a delete for each one held
        that vanished, and return the list's resourceVersion, from which
        watch() goes on. The run threads call it (at start, on 410 Gone);
        the bench (scripts/bench/ours.py) too, to time one list."""
        rv = self._list(self._by_kind[kind], self._known[kind])
        self._rv[kind] = rv
        return rv

    def held(self, kind: str) -> Mapping[str, object]:
        """The objects of `kind` the source holds, by key (read only)."""
        return MappingProxyType(self._known[kind])

    def watch(self, kind: str, since: str | None = None) -> str:
        """Watch `kind` from the resourceVersion of its last list or watch
        (or from `since`) until the server ends the stream, queueing each
        change; returns the resourceVersion reached. Raises GoneError when
        the server no longer has that version (list again), or the error
        that broke the stream (the resourceVersion stays: a retry resumes
        where this one began)."""
        rv = since if since is not None else self._rv[kind]
        if rv is None:
            raise GoneError()  # never listed: there is nothing to resume from
        gen = self._gen[kind]
        rv = self._watch(self._by_kind[kind], self._known[kind], rv)
        if gen == self._gen[kind]:  # else a new selector: the next list sets it
            self._rv[kind] = rv
        return rv

    def _run(self, res: Resource) -> None:
        kind = res.key
        delay = 0.5
        gate = self._gates.get(kind)
        while gate is not None and not gate.wait(0.2):
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            with self._lock:
                if kind in self._switched:
                    self._switched.discard(kind)
                    self._rv[kind] = None  # list with the new selector
            try:
                if self._rv[kind] is None:
                    self.list_all(kind)
                    self._listed.add(kind)
                    delay = 0.5
                self.watch(kind)
                delay = 0.5  # a watch that ended normally: resume at once
            except GoneError:
                log.info("%s watch: resourceVersion %s is too old, listing again", kind, self._rv[kind])
                self.relists += 1
                self._rv[kind] = None
            except Exception as e:  # network, API errors: back off and resume
                if self._stop.is_set():
                    return
                if kind in self._switched:
                    continue  # cut on purpose by set_selector: list at once
                self.reconnects += 1
                wait = delay * (0.5 + random.random())
                log.warning(
                    "%s %s failed (%s); retrying in %.1f s",
                    kind,
                    "list" if self._rv[kind] is None else "watch",
                    _one_line(e),
                    wait,
                )
                self._stop.wait(wait)
                delay = min(delay * 2, self.backoff_max)

    def _list(self, res: Resource, known: dict[str, object]) -> str:
        """List every page; queue upserts for all and deletes for what vanished."""
        with paused_gc():
            return self._list_paused(res, known)

    def _list_paused(self, res: Resource, known: dict[str, object]) -> str:
        seen: dict[str, object] = {}
        events = []

        def take(obj: Service | EndpointSlice | Node) -> None:
            key = _key(res.kind, obj)
            seen[key] = obj
            events.append(Event("upsert", res.kind, key, obj))

        cont = None
        while True:
            params: dict[str, Any] = {
                "limit": LIST_PAGE,
                "labelSelector": res.label_selector,
                "fieldSelector": res.field_selector,
                "continue": cont,
            }
            body = self.client.get_bytes(res.path, **params)
            # Each page is parsed before the next is fetched: its JSON is
            # garbage by then (27 MB for 100,000 endpoints).
            page: Page[EndpointSlice] | Page[Service] | None = None
            if res.kind == "EndpointSlice":
                page = decode_page(body)
            elif res.kind == "Service":
                page = decode_service_page(body)
            if page is not None:
                # A page's events made in C (map, zip): one per object.
                objs = page.items
                keys = [f"{o.namespace}/{o.name}" for o in objs]
                seen.update(zip(keys, objs, strict=True))
                events += map(_new_event, repeat(Event), zip(repeat("upsert"), repeat(res.kind), keys, objs))
                cont, rv = page.continue_, page.resource_version
            else:
                # Nodes, and Service pages the typed decoding declined: only
                # what parse reads is decoded. (A slice page that
                # decode_page declined is parsed whole.)
                trimmed = decode_trimmed_list(body) if res.kind != "EndpointSlice" else None
                doc = trimmed if trimmed is not None else _loads_object(body, f"a {res.kind} list")
                items = doc.get("items") or []
                if not isinstance(items, list):
                    raise ValueError(f"{res.kind} list response: items: {short(items)} is not a list")
                for i, raw in enumerate(items):
                    parsed = self._parse(raw, res.kind, f"{res.kind} list items[{i}]")
                    if parsed is not None:
                        take(parsed)
                        continue
                    # Unusable now: keep the last good version, if any.
                    old_key = _raw_key(res.kind, raw)
                    if old_key is not None and old_key in known:
                        seen[old_key] = known[old_key]
                meta = doc.get("metadata")
                meta = meta if isinstance(meta, dict) else {}
                cont, rv = meta.get("continue"), meta.get("resourceVersion")
                cont = cont if isinstance(cont, str) else None
                rv = rv if isinstance(rv, str) else None
            if not cont:
                if not rv:
                    raise ValueError(f"{res.kind} list response without metadata.resourceVersion")
                break
        for key in known.keys() - seen.keys():
            events.append(Event("delete", res.kind, key))
        known.clear()
        known.update(seen)
        self.events.put(events)
        log.info("listed %d %s objects at resourceVersion %s", len(seen), res.kind, rv)
        return rv

    def _watch(self, res: Resource, known: dict[str, object], rv: str) -> str:
        gen = self._gen[res.key]

        def opened(r) -> None:
            with self._lock:
                self._open[res.key] = r
                cut = gen != self._gen[res.key]
            if cut:  # switched between the request and now
                r.shutdown()

        stream = self.client.stream(
            res.path,
            read_timeout=WATCH_TIMEOUT + 30,
            on_open=opened,
            watch=1,
            allowWatchBookmarks="true",
            resourceVersion=rv,
            timeoutSeconds=WATCH_TIMEOUT,
            labelSelector=res.label_selector,
            fieldSelector=res.field_selector,
        )
        fast = res.kind == "EndpointSlice"
        for line in stream:
            if self._stop.is_set() or gen != self._gen[res.key]:
                break
            change = decode_change(line) if fast else None
            if change is not None:  # a clean slice added or modified
                key = _key(res.kind, change.slice)
                known[key] = change.slice
                self.events.put([Event("upsert", res.kind, key, change.slice)])
                rv = change.resource_version or rv
                continue
            # A line that is not an event object means a broken stream:
            # the ValueError makes _run resume from the last good rv.
            ev = _loads_object(line, f"a {res.kind} watch event")
            typ = ev.get("type")
            raw = ev.get("object")
            if typ == "ERROR":
                status = raw if isinstance(raw, dict) else {}
                code, message = status.get("code"), status.get("message")
                if code == 410:
                    raise GoneError()
                raise APIError(
                    code if isinstance(code, int) else 0,
                    _one_line(message) if isinstance(message, str) and message else "watch error",
                )
            if not isinstance(raw, dict):
                log.error("%s watch event %s: object: %s is not a mapping", res.kind, short(typ), short(raw))
                continue
            meta = raw.get("metadata")
            new_rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
            new_rv = new_rv if isinstance(new_rv, str) and new_rv else None
            if typ == "BOOKMARK":
                rv = new_rv or rv
                continue
            if typ in ("ADDED", "MODIFIED"):
                obj = self._parse(raw, res.kind, f"{res.kind} watch event")
                if obj is not None:
                    key = _key(res.kind, obj)
                    known[key] = obj
                    self.events.put([Event("upsert", res.kind, key, obj)])
            elif typ == "DELETED":
                gone = _raw_key(res.kind, raw)
                if gone is not None and known.pop(gone, None) is not None:
                    self.events.put([Event("delete", res.kind, gone)])
            rv = new_rv or rv
        return rv

    @staticmethod
    def _parse(raw: object, kind: str, where: str) -> Service | EndpointSlice | Node | None:
        """One object of a `kind` list or watch, or None (logged in one line
        naming the object and the field)."""
        if not isinstance(raw, dict):
            log.error("%s: %s is not a mapping", where, short(raw))
            return None
        if raw.get("kind") is None:
            raw["kind"] = kind  # list items carry no kind (and null is absent)
        raw_kind = raw["kind"]
        if raw_kind != kind:
            # Taken as what the resource holds, another kind would reach
            # the state as the wrong type.
            log.error("%s: kind: %s among %s objects; ignored", describe(raw), short(raw_kind), kind)
            return None
        try:
            obj = parse(raw)
        except ObjectError as e:
            log.error("%s", e)
            return None
        if obj.problems:
            log.error("%s", problem_line(obj.problems))
        return obj


def _raw_key(kind: str, raw: object) -> str | None:
    """The key of an object that may not parse, as far as it tells."""
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    if kind == "Node":
        return meta["name"]
    ns = meta.get("namespace")
    return f"{ns if isinstance(ns, str) and ns else 'default'}/{meta['name']}"


def _key(kind: str, obj) -> str:
    return obj.name if kind == "Node" else f"{obj.namespace}/{obj.name}"


_new_event = tuple.__new__  # Event((...)) without the NamedTuple's Python __new__


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or os.uname().nodename


__all__ = ["Client", "KubeSource", "describe"]
