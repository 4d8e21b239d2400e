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

Responses are decoded with msgspec: EndpointSlice list pages straight
into ctrl.objects (ctrl.slicejson), everything else into dicts for
ctrl.objects.parse; never with the kubernetes client's model classes
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
from dataclasses import dataclass
from typing import Any

import msgspec
import urllib3

from ..gcpause import paused_gc
from ..objects import EndpointSlice, Node, ObjectError, Service, describe, parse
from ..slicejson import decode_change, decode_page
from ..state import Event

log = logging.getLogger("sliceproxy.source.kube")

# kube-proxy's selector: Services handed to another proxy, and headless
# ones, are not ours; the API server filters them out for us.
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

LIST_PAGE = 500
WATCH_TIMEOUT = 300  # seconds the server keeps one watch open
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass
class Resource:
    kind: str
    path: str  # collection path
    label_selector: str | None = None
    field_selector: str | None = None


def resources(node_name: str) -> list[Resource]:
    return [
        Resource("Service", "/api/v1/services", PROXY_SELECTOR),
        Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", PROXY_SELECTOR),
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
    def from_config(cls, kubeconfig: str | None) -> Client:
        """From a kubeconfig file, or the in-cluster ServiceAccount when None."""
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        cfg = kclient.Configuration()
        if kubeconfig:
            kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            token_file = None
        else:
            kconfig.load_incluster_config(client_configuration=cfg)
            token_file = IN_CLUSTER_TOKEN  # rotated by the kubelet: re-read it
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

    def stream(self, path: str, read_timeout: float, **params):
        """Yield each line of a watch response (one JSON event each)."""
        r = self.pool.request(
            "GET",
            self.url(path, **params),
            headers=self._headers(),
            preload_content=False,
            timeout=urllib3.Timeout(connect=5, read=read_timeout),
            retries=False,
        )
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
        raise ValueError(f"invalid JSON from the API server: {e}") from None


def _status_message(body: bytes) -> str:
    try:
        return _loads(body).get("message") or body[:200].decode(errors="replace")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


class GoneError(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KubeSource:
    """Events from the API server; same interface as FileSource."""

    def __init__(self, client: Client, node_name: str, backoff_max: float = 30.0):
        self.client = client
        self.node_name = node_name
        self.events: queue.Queue[list[Event]] = queue.Queue()
        self.backoff_max = backoff_max
        self._resources = resources(node_name)
        self._listed: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.relists = 0  # 410 Gone handled, for tests and metrics
        self.reconnects = 0

    @property
    def synced(self) -> bool:
        return len(self._listed) == len(self._resources)

    def start(self) -> None:
        for res in self._resources:
            t = threading.Thread(target=self._run, args=(res,), name=f"watch-{res.kind}", daemon=True)
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
    def _run(self, res: Resource) -> None:
        known: dict[str, object] = {}  # key -> parsed object
        rv: str | None = None
        delay = 0.5
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list(res, known)
                    self._listed.add(res.kind)
                    delay = 0.5
                rv = self._watch(res, known, rv)
                delay = 0.5  # a watch that ended normally: resume at once
            except GoneError:
                log.info("%s watch: resourceVersion %s is too old, listing again", res.kind, rv)
                self.relists += 1
                rv = None
            except Exception as e:  # network, API errors: back off and resume
                if self._stop.is_set():
                    return
                self.reconnects += 1
                wait = delay * (0.5 + random.random())
                log.warning(
                    "%s %s failed (%s); retrying in %.1f s",
                    res.kind,
                    "list" if rv is None else "watch",
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
            page = decode_page(body) if res.kind == "EndpointSlice" else None
            if page is not None:
                for obj in page.items:
                    take(obj)
                cont, rv = page.continue_, page.resource_version
            else:
                doc = _loads(body)
                for raw in doc.get("items") or []:
                    raw.setdefault("kind", res.kind)  # list items carry no kind
                    obj = self._parse(raw)
                    if obj is not None:
                        take(obj)
                        continue
                    # Unusable now: keep the last good version, if any.
                    key = _raw_key(res.kind, raw)
                    if key in known:
                        seen[key] = known[key]
                meta = doc.get("metadata") or {}
                cont, rv = meta.get("continue"), meta.get("resourceVersion")
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
        stream = self.client.stream(
            res.path,
            read_timeout=WATCH_TIMEOUT + 30,
            watch=1,
            allowWatchBookmarks="true",
            resourceVersion=rv,
            timeoutSeconds=WATCH_TIMEOUT,
            labelSelector=res.label_selector,
            fieldSelector=res.field_selector,
        )
        fast = res.kind == "EndpointSlice"
        for line in stream:
            if self._stop.is_set():
                break
            change = decode_change(line) if fast else None
            if change is not None:  # a clean slice added or modified
                key = _key(res.kind, change.slice)
                known[key] = change.slice
                self.events.put([Event("upsert", res.kind, key, change.slice)])
                rv = change.resource_version or rv
                continue
            ev = _loads(line)
            typ = ev.get("type")
            raw = ev.get("object") or {}
            if typ == "ERROR":
                if raw.get("code") == 410:
                    raise GoneError()
                raise APIError(raw.get("code") or 0, raw.get("message") or "watch error")
            new_rv = (raw.get("metadata") or {}).get("resourceVersion")
            if typ == "BOOKMARK":
                rv = new_rv or rv
                continue
            raw.setdefault("kind", res.kind)
            if typ in ("ADDED", "MODIFIED"):
                obj = self._parse(raw)
                if obj is not None:
                    key = _key(res.kind, obj)
                    known[key] = obj
                    self.events.put([Event("upsert", res.kind, key, obj)])
            elif typ == "DELETED":
                key = _raw_key(res.kind, raw)
                if known.pop(key, None) is not None:
                    self.events.put([Event("delete", res.kind, key)])
            rv = new_rv or rv
        return rv

    @staticmethod
    def _parse(raw: dict):
        try:
            obj = parse(raw)
        except ObjectError as e:
            log.error("%s", e)
            return None
        for problem in getattr(obj, "problems", ()):
            log.error("%s", problem)
        return obj


def _raw_key(kind: str, raw: dict) -> str:
    meta = raw.get("metadata") or {}
    return meta.get("name", "") if kind == "Node" else f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _key(kind: str, obj) -> str:
    return obj.name if kind == "Node" else f"{obj.namespace}/{obj.name}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or os.uname().nodename


__all__ = ["Client", "KubeSource", "describe"]
