"""The local VM (vagrant/, docs/local-vm.md), checked without booting it.

Nothing here can start a VM (CI has no virtualization), so the tests check
what can be checked on any Linux host, offline:

- `vagrant validate --ignore-provider` accepts the Vagrantfile. It checks
  the machine settings and that every provisioning script exists; it needs
  no box and no provider (`--ignore-provider` skips the virtualbox/libvirt
  blocks, which need their plugin to be read). Vagrant's state goes to a
  temporary HOME, VAGRANT_HOME and dotfile path, never to ~ or vagrant/.
- shellcheck passes on every shell script under vagrant/.
- The provisioning deploys the repository's real manifests: k3s without
  kube-proxy, deploy/rbac.yaml as is, deploy/daemonset.yaml through
  adapt_daemonset.py, whose result is compared field by field with the
  manifest, and the image from deploy/Containerfile.

Missing vagrant or shellcheck is a failure, never a skip: a skipped check
reads as a passing one. `make deps` installs both.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
PROVISION = VAGRANT_DIR / "provision"
SMOKE = VAGRANT_DIR / "smoke-test.sh"
SMOKE_YAML = VAGRANT_DIR / "smoke" / "web.yaml"
DAEMONSET = ROOT / "deploy" / "daemonset.yaml"

# The Vagrantfile's provisioners, in the order they must run.
PROVISIONERS = [("base", "provision/base.sh"), ("k3s", "provision/k3s.sh"), ("sliceproxy", "provision/sliceproxy.sh")]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make deps` (scripts/install-deps.sh installs it)", pytrace=False)
    return path


def code_lines(path: Path) -> str:
    """The script without its comment lines, so a commented-out command never counts."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def shell_scripts() -> list[Path]:
    return sorted(p for p in VAGRANT_DIR.rglob("*.sh") if ".vagrant" not in p.parts)


# --- vagrant validate ---------------------------------------------------------


def vagrant_validate(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    vagrant = tool("vagrant")
    # The Vagrantfile's own knobs and any VAGRANT_* of the caller would change
    # what is validated; the defaults are what `make vagrant-up` uses.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAGRANT_", "SLICEPROXY_VM_", "SLICEPROXY_K3S_"))}
    env.update(
        HOME=str(tmp_path / "home"),
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
        VAGRANT_CHECKPOINT_DISABLE="1",  # no version check over the network
        VAGRANT_NO_COLOR="1",
    )
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run(
        [vagrant, "validate", "--ignore-provider"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_vagrantfile_validates(tmp_path):
    before = sorted(p.name for p in VAGRANT_DIR.iterdir())
    r = vagrant_validate(VAGRANT_DIR, tmp_path)
    assert r.returncode == 0, f"vagrant validate failed:\n{r.stdout}\n{r.stderr}"
    assert "validated successfully" in r.stdout
    # Its state went to the temporary paths, not into the repository.
    assert sorted(p.name for p in VAGRANT_DIR.iterdir()) == before


def _drop_script(d: Path) -> None:
    (d / "provision" / "k3s.sh").unlink()


def _misspell_setting(d: Path) -> None:
    vf = d / "Vagrantfile"
    vf.write_text(vf.read_text().replace("config.vm.hostname =", "config.vm.hostnme =", 1))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(_drop_script, "k3s.sh"), (_misspell_setting, "hostnme")],
    ids=["missing-provisioning-script", "unknown-setting"],
)
def test_validate_rejects_a_broken_vagrantfile(tmp_path, mutate, expected):
    """The validation above can fail: a copy of vagrant/ with one mistake is rejected."""
    copy_dir = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy_dir, ignore=shutil.ignore_patterns(".vagrant"))
    mutate(copy_dir)
    r = vagrant_validate(copy_dir, tmp_path)
    assert r.returncode != 0, r.stdout
    assert expected in r.stdout + r.stderr


def test_provisioners_run_the_scripts_in_order():
    text = VAGRANT_DIR.joinpath("Vagrantfile").read_text()
    found = re.findall(r'config\.vm\.provision\s+"(\w+)",\s*type:\s*"shell",\s*path:\s*"([^"]+)"', text)
    assert found == PROVISIONERS
    for _, path in found:
        assert (VAGRANT_DIR / path).is_file()


def test_vagrantfile_pins_its_defaults():
    """The box and k3s version are pinned defaults, overridable, never 'latest'."""
    text = VAGRANT_DIR.joinpath("Vagrantfile").read_text()
    assert re.search(r'K3S_VERSION = ENV\.fetch\("SLICEPROXY_K3S_VERSION", "v\d+\.\d+\.\d+\+k3s\d+"\)', text)
    assert re.search(r'BOX = ENV\.fetch\("SLICEPROXY_VM_BOX", "[\w.-]+/[\w.-]+"\)', text)


# --- shellcheck ----------------------------------------------------------------


def test_every_provisioning_script_is_checked():
    names = {p.relative_to(VAGRANT_DIR).as_posix() for p in shell_scripts()}
    assert {
        "provision/base.sh",
        "provision/k3s.sh",
        "provision/sliceproxy.sh",
        "provision/lib.sh",
        "smoke-test.sh",
    } <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(VAGRANT_DIR).as_posix())
def test_shellcheck(script):
    r = subprocess.run(
        [tool("shellcheck"), "--external-sources", "--severity=style", script.name],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_rejects_a_broken_script(tmp_path):
    """The check above can fail."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nset -euo pipefail\ndir=$1\nrm -rf $dir/*\n")
    r = subprocess.run([tool("shellcheck"), bad.name], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "SC2086" in r.stdout


@pytest.mark.parametrize(
    "script", [p for p in shell_scripts() if p.name != "lib.sh"], ids=lambda p: p.relative_to(VAGRANT_DIR).as_posix()
)
def test_scripts_stop_at_the_first_error(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert os.access(script, os.X_OK), f"{script} is not executable"


# --- what the provisioning deploys ------------------------------------------


def k3s_config() -> dict:
    """The /etc/rancher/k3s/config.yaml that provision/k3s.sh writes."""
    text = (PROVISION / "k3s.sh").read_text()
    m = re.search(r"<<'CONF'\n(.*?)\nCONF\n", text, re.S)
    assert m, "provision/k3s.sh writes no k3s config heredoc"
    assert re.search(r"^config=/etc/rancher/k3s/config\.yaml$", text, re.M)
    return yaml.safe_load(m.group(1))


def test_k3s_runs_without_kube_proxy():
    cfg = k3s_config()
    assert cfg["disable-kube-proxy"] is True
    # Why each of these is off is in provision/k3s.sh and docs/local-vm.md.
    assert cfg["disable-network-policy"] is True
    assert {"coredns", "traefik", "servicelb"} <= set(cfg["disable"])
    assert cfg["flannel-backend"] == "vxlan"
    # The smoke test's check greps the same line.
    assert "grep -qx 'disable-kube-proxy: true' /etc/rancher/k3s/config.yaml" in SMOKE.read_text()


def test_k3s_version_comes_from_the_vagrantfile():
    code = code_lines(PROVISION / "k3s.sh")
    assert 'INSTALL_K3S_VERSION="$K3S_VERSION"' in code
    assert '"K3S_VERSION" => K3S_VERSION' in VAGRANT_DIR.joinpath("Vagrantfile").read_text()


def test_provisioning_builds_and_applies_the_repository_manifests():
    code = code_lines(PROVISION / "sliceproxy.sh")
    assert re.search(r"^make bpf native$", code, re.M)
    # The image: the repository's one build (scripts/build-images.sh, as
    # `make image` and tests/node), imported from the archive it saved.
    assert re.search(r"^read -r archive image < <\(bash scripts/build-images\.sh --ref sliceproxy\)$", code, re.M)
    assert re.search(r'^\s*k3s ctr -n k8s\.io images import "\$archive"$', code, re.M)
    assert re.search(r"^\s*k3s ctr -n k8s\.io images import ", code, re.M)
    assert re.search(r"^kubectl apply -f deploy/rbac\.yaml$", code, re.M)
    # The DaemonSet: rendered from the repository's file, adapted, applied.
    assert re.search(
        r"^kubectl create --dry-run=client -o json -f deploy/daemonset\.yaml \|\n"
        r"\s*python3 vagrant/provision/adapt_daemonset\.py \\\n"
        r'\s*--image "\$image" --interfaces "\$POD_INTERFACES" --kubelet-kubeconfig "\$KUBELET_KUBECONFIG" \\\n'
        r'\s*>"\$STATE/daemonset\.json\.new"$',
        code,
        re.M,
    )
    assert re.search(r'^kubectl apply -f "\$STATE/daemonset\.json"$', code, re.M)
    assert re.search(r"^if ! kubectl -n kube-system rollout status ds/sliceproxy ", code, re.M)
    assert (ROOT / "deploy" / "rbac.yaml").is_file() and DAEMONSET.is_file()
    assert (ROOT / "deploy" / "Containerfile").is_file()


def test_base_installs_the_repository_dependencies():
    code = code_lines(PROVISION / "base.sh")
    assert re.search(r'^bash "\$SLICEPROXY_REPO/scripts/install-deps\.sh"$', code, re.M)
    assert re.search(r"^apt-get install .*\bpodman\b", code, re.M)


# --- adapt_daemonset.py on the real manifest ----------------------------------


def load_adapter():
    spec = importlib.util.spec_from_file_location("adapt_daemonset", PROVISION / "adapt_daemonset.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    # No __pycache__ left in vagrant/ (it would be synced into the VM).
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = saved
    return mod


def script_setting(name: str) -> str:
    """A NAME=value line of provision/sliceproxy.sh, unquoted."""
    m = re.search(rf"^{name}=(.+)$", (PROVISION / "sliceproxy.sh").read_text(), re.M)
    assert m, f"provision/sliceproxy.sh sets no {name}"
    return m.group(1).strip("'\"")


def leaf_paths(a, b, path=()) -> set[tuple]:
    """Paths at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple] = set()
        for k in a.keys() | b.keys():
            if k not in a or k not in b:
                out.add((*path, k))
            else:
                out |= leaf_paths(a[k], b[k], (*path, k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = set()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out |= leaf_paths(x, y, (*path, i))
        return out
    return set() if a == b else {path}


def the_container(ds: dict) -> tuple[int, dict]:
    cs = ds["spec"]["template"]["spec"]["containers"]
    [(i, c)] = [(i, c) for i, c in enumerate(cs) if c["name"] == "sliceproxy"]
    return i, c


def test_adapted_daemonset_is_the_manifest_plus_the_vm_settings():
    adapter = load_adapter()
    interfaces = script_setting("POD_INTERFACES")
    kubelet_conf = script_setting("KUBELET_KUBECONFIG")
    assert kubelet_conf == "/var/lib/rancher/k3s/agent/kubelet.kubeconfig"  # k3s's agent
    assert interfaces == "veth*"  # k3s's flannel (bridge plugin) host-side veths

    original = yaml.safe_load(DAEMONSET.read_text())
    pristine = copy.deepcopy(original)
    image = "docker.io/library/sliceproxy:vm-0123456789ab"
    out = adapter.adapt(original, image, interfaces, kubelet_conf)
    assert original == pristine, "adapt() changed its input"

    i, c = the_container(out)
    _, c0 = the_container(original)
    assert c["image"] == image and c["imagePullPolicy"] == "Never"
    args = c0["command"]
    [k] = [n for n, a in enumerate(args) if a.startswith("--interfaces=")]
    assert c["command"] == args[:k] + [f"--interfaces={interfaces}"] + args[k + 1 :]
    assert c["env"] == c0["env"]  # no API address override: --api-server-from
    [vol] = [v for v in out["spec"]["template"]["spec"]["volumes"] if v["name"] == "kubelet-conf"]
    assert vol["hostPath"]["path"] == kubelet_conf
    assert c["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}

    base = ("spec", "template", "spec", "containers", i)
    changed = leaf_paths(original, out)
    [v] = [n for n, v in enumerate(original["spec"]["template"]["spec"]["volumes"]) if v["name"] == "kubelet-conf"]
    conf_path = ("spec", "template", "spec", "volumes", v, "hostPath", "path")
    allowed = {(*base, "image"), (*base, "imagePullPolicy"), (*base, "command", k), conf_path}
    # appArmorProfile may already hold the manifest's placeholder.
    prefixes = [(*base, "securityContext", "appArmorProfile")]
    unexpected = {p for p in changed if p not in allowed and not any(p[: len(q)] == q for q in prefixes)}
    assert not unexpected, unexpected
    assert {(*base, "image"), (*base, "command", k)} <= changed


def test_adapter_command_line_end_to_end():
    """As provision/sliceproxy.sh runs it: JSON in, JSON out, the VM's python3 (stdlib only)."""
    ds = yaml.safe_load(DAEMONSET.read_text())
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            str(PROVISION / "adapt_daemonset.py"),
            "--image",
            "img:1",
            "--interfaces",
            "veth*",
            "--kubelet-kubeconfig",
            "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
        ],
        input=json.dumps(ds),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    _, c = the_container(json.loads(r.stdout))
    assert c["image"] == "img:1" and "--interfaces=veth*" in c["command"]


def _ds(container: dict, kind: str = "DaemonSet", volumes: list | None = None) -> dict:
    if volumes is None:
        volumes = [{"name": "kubelet-conf", "hostPath": {"path": "/etc/kubernetes/kubelet.conf", "type": "File"}}]
    return {
        "kind": kind,
        "metadata": {"name": "sliceproxy"},
        "spec": {"template": {"spec": {"containers": [container], "volumes": volumes}}},
    }


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        (_ds({"name": "sliceproxy", "command": ["run"]}, kind="Deployment"), "expected a DaemonSet"),
        (_ds({"name": "agent", "command": ["run", "--interfaces=x"]}), "one container named 'sliceproxy'"),
        (_ds({"name": "sliceproxy", "command": ["run"]}), "one --interfaces argument"),
        (_ds({"name": "sliceproxy", "command": ["run", "--interfaces=a", "--interfaces=b"]}), "found 2"),
        (
            _ds({"name": "sliceproxy", "command": ["run", "--interfaces=a"], "args": ["--interfaces=b"]}),
            "one --interfaces argument in command or args",
        ),
        (_ds({"name": "sliceproxy", "command": ["run", "--interfaces"]}), "has no value"),
        (_ds({"name": "sliceproxy", "command": ["run", "--interfaces=a"]}, volumes=[]), "volume named 'kubelet-conf'"),
    ],
    ids=[
        "not-a-daemonset",
        "no-sliceproxy-container",
        "no-interfaces",
        "two-interfaces",
        "interfaces-twice",
        "interfaces-without-value",
        "no-kubelet-conf-volume",
    ],
)
def test_adapter_refuses_a_manifest_it_cannot_adapt(ds, message):
    """If deploy/daemonset.yaml changes shape, provisioning stops with a reason instead of guessing."""
    adapter = load_adapter()
    with pytest.raises(adapter.AdaptError, match=re.escape(message)):
        adapter.adapt(ds, "img", "veth*", "/k3s/kubelet.kubeconfig")


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        ({"name": "sliceproxy", "args": ["run", "--interfaces", "cali*"]}, ("args", ["run", "--interfaces", "veth*"])),
        (
            {"name": "sliceproxy", "command": ["sliceproxy"], "args": ["--interfaces=cali*"]},
            ("args", ["--interfaces=veth*"]),
        ),
        (
            {"name": "sliceproxy", "command": ["run", "--interfaces=x"], "env": [{"name": "A", "value": "1"}]},
            ("env", [{"name": "A", "value": "1"}]),
        ),
    ],
    ids=["separate-value-in-args", "in-args", "env-untouched"],
)
def test_adapter_variants(container, expected):
    adapter = load_adapter()
    _, c = the_container(adapter.adapt(_ds(container), "img", "veth*", "/k3s/kubelet.kubeconfig"))
    key, value = expected
    assert c[key] == value


# --- the smoke test's workload --------------------------------------------------


def test_smoke_workload_is_consistent():
    docs = {d["kind"]: d for d in yaml.safe_load_all(SMOKE_YAML.read_text())}
    assert set(docs) == {"Namespace", "Deployment", "Service", "Pod"}
    ns = docs["Namespace"]["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == ns for k, d in docs.items() if k != "Namespace")
    assert f"NS={ns}" in SMOKE.read_text()

    dep, svc, client = docs["Deployment"], docs["Service"], docs["Pod"]
    selector = svc["spec"]["selector"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= client["metadata"].get("labels", {}).items(), "the client must not be a backend"
    assert dep["spec"]["replicas"] == 2

    [server] = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in server["ports"]}
    assert f"--http-port={ports['http'][0]}" in server["args"] and f"--udp-port={ports['udp'][0]}" in server["args"]
    frontends = {(p["port"], p["protocol"]): ports[p["targetPort"]] for p in svc["spec"]["ports"]}
    # What the smoke test expects sliceproxy dump to show.
    assert frontends == {(80, "TCP"): (8080, "TCP"), (8081, "UDP"): (8081, "UDP")}
    smoke = SMOKE.read_text()
    assert '"$vip:80/TCP" "$want_tcp"' in smoke and '"$vip:8081/UDP" "$want_udp"' in smoke
    assert '":8080"' in smoke and '":8081"' in smoke
    assert '"$REPO/vagrant/smoke/web.yaml"' in code_lines(SMOKE)


def test_smoke_test_reads_the_agent_maps():
    code = code_lines(SMOKE)
    assert "kubectl -n kube-system exec ds/sliceproxy -- sliceproxy dump" in code
    assert re.search(r"^\(\(after - before >= REQUESTS \+ 1\)\)", code, re.M)


# --- make targets ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        ("vagrant-up", r"^cd vagrant && vagrant up$"),
        ("vagrant-test", r"^cd vagrant && vagrant ssh -c '.*vagrant/smoke-test\.sh'$"),
        ("vagrant-redeploy", r"^cd vagrant && vagrant rsync && vagrant provision --provision-with sliceproxy$"),
    ],
    ids=["vagrant-up", "vagrant-test", "vagrant-redeploy"],
)
def test_make_target(target, pattern):
    r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"the Makefile has no working `{target}` target (docs/local-vm.md uses it):\n{r.stderr}"
    assert re.search(pattern, r.stdout, re.M), r.stdout
