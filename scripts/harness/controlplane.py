"""A real Kubernetes control plane on loopback for tier 4 (docs/architecture.md, "Test
tiers"): etcd, kube-apiserver and kube-controller-manager, started from the
binaries `make k8s` (scripts/build-k8s.sh) puts in a cache outside the repo.

Everything listens on 127.0.0.1 at random free ports, and every file (certs,
keys, etcd data, kubeconfig, one log per process) lives in one temp dir that
``stop()`` removes. No kubelet, scheduler or cloud runs: a test makes Nodes
and Pods through the API and plays the kubelet by patching pod status.

Only the standard library is used (urllib + the ``openssl`` CLI), so the
fixture needs nothing the venv does not already have.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
VERSION_FILE = REPO / "scripts" / "k8s-version"
DEFAULT_CACHE = "/var/cache/sliceproxy"

# The test range for virtual IPs (docs/architecture.md: 198.18.0.0/15 only).
SERVICE_CIDR = "198.19.0.0/16"
# The secondary (IPv6) range: Services may be dual-stack. 2001:db8::/32 is
# the IPv6 test range; an IPv6 Service range may hold at most 2^20 addresses.
SERVICE_CIDR_V6 = "2001:db8:19::/112"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# KCM controllers left out, and why:
# - node-lifecycle: no kubelet heartbeats here, so after the grace period it
#   would mark every Node unreachable and flip every Pod on it to NotReady,
#   which is exactly what the EndpointSlice tests must control themselves.
# - taint-eviction: would evict Pods from such Nodes afterwards.
# - node-ipam: no cluster CIDR to allocate from.
DISABLED_CONTROLLERS = ("node-lifecycle-controller", "taint-eviction-controller", "node-ipam-controller")

# On SIGTERM the apiserver stops accepting, drains plain requests at once,
# then waits in http.Server.Shutdown for connections that hold watches, up to
# --request-timeout (60s): the controller-manager's always do. Nothing here
# needs that wait (etcd has every write), so it is cut short with SIGKILL.
APISERVER_STOP_GRACE = 2.0

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (or restarted)."""


class BinariesMissing(ControlPlaneError):
    """The Kubernetes binaries have not been built: run `make k8s`."""


def k8s_version() -> str:
    """The pinned release, read from the one place it is written."""
    return VERSION_FILE.read_text().strip()


def k8s_bin_dir() -> Path:
    """Same path logic as scripts/build-k8s.sh."""
    cache = os.environ.get("SLICEPROXY_K8S_CACHE") or DEFAULT_CACHE
    return Path(cache) / f"k8s-{k8s_version()}"


def find_binaries() -> dict[str, Path]:
    """Paths of etcd, kube-apiserver and kube-controller-manager, or
    BinariesMissing naming what is missing and how to get it."""
    bin_dir = k8s_bin_dir()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in ("kube-apiserver", "kube-controller-manager"):
        p = bin_dir / name
        if os.access(p, os.X_OK):
            found[name] = p
        else:
            missing.append(str(p))
    # An etcd built into the cache (if Debian's ever proves too old) wins
    # over the one on PATH.
    etcd = bin_dir / "etcd"
    if os.access(etcd, os.X_OK):
        found["etcd"] = etcd
    elif which := shutil.which("etcd"):
        found["etcd"] = Path(which)
    else:
        missing.append("etcd (Debian package etcd-server)")
    if missing:
        raise BinariesMissing(
            f"Kubernetes {k8s_version()} control plane binaries missing: {', '.join(missing)}. "
            "Run `make k8s` (scripts/build-k8s.sh) first; the first build takes 10-30 minutes."
        )
    return found


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    fn: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll ``fn`` until it returns something truthy and return that; raise
    TimeoutError naming ``what`` (and the last exception, if any) otherwise."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = fn()
            if result:
                return result
        except ControlPlaneError:
            raise  # a process died: waiting longer cannot help
        except Exception as e:  # noqa: BLE001 - reported below
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the test process dies,
    so a killed pytest leaves no etcd or apiserver behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


class _Proc:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} starting {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with status {self.popen.returncode}; last lines of {self.log}:\n{_tail(self.log)}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.popen = None


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

    Use as a context manager, or call ``start()`` and ``stop()``. After start:
    ``server`` (https URL), ``token`` (admin, group system:masters),
    ``ca_file`` (verifies the apiserver), ``kubeconfig`` (a file with all
    three), ``request()`` for quick API calls, and ``restart_apiserver()``.
    """

    ADMIN_USER = "sliceproxy-test-admin"

    def __init__(self, startup_timeout: float = 120.0) -> None:
        self.startup_timeout = startup_timeout
        self.bins = find_binaries()
        self.dir: Path | None = None
        self.server = ""
        self.token = ""
        self.ca_file = ""
        self.kubeconfig = ""
        self.ports: dict[str, int] = {}
        self.startup_seconds = 0.0
        self._procs: dict[str, _Proc] = {}
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="sliceproxy-k8s-"))
        try:
            self._make_certs()
            self._write_auth()
            self._start_etcd()
            self._start_apiserver()
            self._start_kcm()
            self._wait_cluster_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop every process (controller-manager first, etcd last) and remove
        the temp dir. Safe to call twice. Set SLICEPROXY_KEEP_K8S_DIR=1 to
        keep the dir (logs, etcd data) for a post-mortem."""
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.stop(APISERVER_STOP_GRACE if name == "kube-apiserver" else 10.0)
        if self.dir is not None:
            if os.environ.get("SLICEPROXY_KEEP_K8S_DIR"):
                print(f"control plane dir kept: {self.dir}")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def restart_apiserver(self, down_seconds: float = 0.0, with_controller_manager: bool = True) -> None:
        """Stop the apiserver and start it again with the same flags and port
        (etcd keeps the data). Returns once /readyz answers ok again. Clients
        see their connections (watches included) cut, as on a crash.
        ``down_seconds`` keeps it down that long first, for tests of client
        back-off.

        The controller-manager is stopped first and started again after: its
        informers back off exponentially (up to a minute with jitter, reset
        only after two quiet minutes) on every apiserver outage, so after two
        restarts in a row it could take a minute to notice a new Pod. Pass
        ``with_controller_manager=False`` to leave it running through the
        outage instead."""
        kcm = self._procs["kube-controller-manager"]
        if with_controller_manager:
            kcm.stop()
        proc = self._procs["kube-apiserver"]
        proc.stop(APISERVER_STOP_GRACE)
        if down_seconds:
            time.sleep(down_seconds)
        proc.start()
        self._wait_apiserver_ready(proc)
        if with_controller_manager:
            self._start_kcm()

    def log_path(self, name: str) -> Path:
        """The log file of one process: etcd, kube-apiserver or
        kube-controller-manager."""
        return self._procs[name].log

    def log_tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.log_path(name), lines)

    # -- API helper ----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One API call; returns (HTTP status, decoded JSON body, or the raw
        text when the body is not JSON). ``token`` defaults to the admin's.
        A dict body is sent as JSON; PATCH defaults to a merge patch (pass
        ``content_type="application/strategic-merge-patch+json"`` etc.)."""
        data = None
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token or self.token}"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if content_type is None:
                content_type = "application/merge-patch+json" if method.upper() == "PATCH" else "application/json"
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.server + path, data=data, headers=headers, method=method.upper())
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """``request`` that raises unless the status is 2xx; returns the body."""
        status, obj = self.request(method, path, body, **kw)
        if not 200 <= status < 300:
            raise AssertionError(f"{method} {path} -> {status}: {obj}")
        return obj

    def wait_service_account(self, namespace: str, name: str = "default", timeout: float = 30.0) -> None:
        """Pods need their ServiceAccount (admission rejects them without);
        the controller-manager makes ``default`` shortly after a namespace."""

        def exists() -> bool:
            status, _ = self.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            return status == 200

        wait_until(exists, timeout, what=f"ServiceAccount {namespace}/{name}")

    # -- internals -----------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.dir is not None
        return self.dir / name

    def _openssl(self, *args: str) -> None:
        r = subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")

    def _make_certs(self) -> None:
        """A CA, one serving cert for 127.0.0.1/localhost (apiserver and
        controller-manager), and the service-account signing key pair. EC
        P-256 keys: as good as RSA here, and generated instantly."""
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        self._openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=sliceproxy-test-ca",
        )  # fmt: skip
        self._openssl("req", *ec, "-keyout", "serving.key", "-out", "serving.csr", "-subj", "/CN=127.0.0.1")
        self._path("serving.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:198.19.0.1\n"
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        self._openssl(
            "x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "serving.crt", "-days", "3650", "-extfile", "serving.ext",
        )  # fmt: skip
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        self.ca_file = str(self._path("ca.crt"))
        self._ssl = ssl.create_default_context(cafile=self.ca_file)

    def _write_auth(self) -> None:
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        # token,user,uid,"groups": system:masters passes every RBAC check.
        self._path("tokens.csv").write_text(f'{self.token},{self.ADMIN_USER},{self.ADMIN_USER},"system:masters"\n')
        for name in ("kube-apiserver", "kube-controller-manager", "etcd"):
            self.ports[name] = free_port()
        self.ports["etcd-peer"] = free_port()
        self.server = f"https://127.0.0.1:{self.ports['kube-apiserver']}"
        ca_data = base64.b64encode(self._path("ca.crt").read_bytes()).decode()
        kubeconfig = self._path("kubeconfig")
        kubeconfig.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: sliceproxy-test\n"
            "  cluster:\n"
            f"    server: {self.server}\n"
            f"    certificate-authority-data: {ca_data}\n"
            "users:\n"
            "- name: admin\n"
            "  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n"
            "- name: sliceproxy-test\n"
            "  context:\n"
            "    cluster: sliceproxy-test\n"
            "    user: admin\n"
            "current-context: sliceproxy-test\n"
        )
        kubeconfig.chmod(0o600)
        self.kubeconfig = str(kubeconfig)

    def _env(self) -> dict[str, str]:
        # Nothing from the caller's environment may point a process at another
        # cluster or etcd (ETCD_* are etcd's flag twins).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "KUBECONFIG"))}
        env.pop("HTTPS_PROXY", None)
        env.pop("https_proxy", None)
        env.pop("HTTP_PROXY", None)
        env.pop("http_proxy", None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        return env

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        proc = _Proc(name, argv, self._path(f"{name}.log"), self._env())
        self._procs[name] = proc
        proc.start()
        return proc

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        proc = self._spawn(
            "etcd",
            [
                str(self.bins["etcd"]),
                "--name=sliceproxy-test",
                f"--data-dir={self._path('etcd-data')}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=sliceproxy-test={peer}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            proc.check_alive()
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"

        self._wait(proc, healthy, "etcd /health")

    def _apiserver_argv(self) -> list[str]:
        return [
            str(self.bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['kube-apiserver']}",
            f"--cert-dir={self._path('apiserver-certs')}",
            f"--tls-cert-file={self._path('serving.crt')}",
            f"--tls-private-key-file={self._path('serving.key')}",
            f"--client-ca-file={self._path('ca.crt')}",
            f"--token-auth-file={self._path('tokens.csv')}",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={self._path('sa.pub')}",
            f"--service-account-signing-key-file={self._path('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}",
            # The reconciler would publish 127.0.0.1 as the endpoint of the
            # `kubernetes` Service, which Endpoints validation rejects
            # (loopback); nothing here needs that Service to have endpoints.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]

    def _start_apiserver(self) -> None:
        proc = self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait_apiserver_ready(proc)

    def _wait_apiserver_ready(self, proc: _Proc) -> None:
        def ready() -> bool:
            proc.check_alive()
            status, body = self.request("GET", "/readyz", timeout=5)
            return status == 200 and body == "ok"

        self._wait(proc, ready, "kube-apiserver /readyz")

    def _start_kcm(self) -> None:
        kubeconfig = self.kubeconfig
        controllers = ",".join(["*", *(f"-{c}" for c in DISABLED_CONTROLLERS)])
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(self.bins["kube-controller-manager"]),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kube-controller-manager']}",
                f"--cert-dir={self._path('kcm-certs')}",
                f"--tls-cert-file={self._path('serving.crt')}",
                f"--tls-private-key-file={self._path('serving.key')}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--controllers={controllers}",
                # serviceaccount-token and root-ca publisher need these.
                f"--service-account-private-key-file={self._path('sa.key')}",
                f"--root-ca-file={self._path('ca.crt')}",
                f"--cluster-signing-cert-file={self._path('ca.crt')}",
                f"--cluster-signing-key-file={self._path('ca.key')}",
                "--profiling=false",
                "--v=1",
            ],
        )
        port = self.ports["kube-controller-manager"]

        def healthy() -> bool:
            proc.check_alive()
            url = f"https://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=self._ssl) as r:
                return r.read() == b"ok"

        self._wait(proc, healthy, "kube-controller-manager /healthz")

    def _wait_cluster_ready(self) -> None:
        kcm = self._procs["kube-controller-manager"]

        def default_sa() -> bool:
            kcm.check_alive()
            status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=5)
            return status == 200

        self._wait(kcm, default_sa, "ServiceAccount default/default (controller-manager)")

    def _wait(self, proc: _Proc, fn: Callable[[], bool], what: str) -> None:
        try:
            wait_until(fn, self.startup_timeout, interval=0.2, what=what)
        except TimeoutError as e:
            raise ControlPlaneError(f"{e}; last lines of {proc.log}:\n{_tail(proc.log)}") from None
