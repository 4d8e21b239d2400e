"""--api-server-from: the API server's address read from the kubelet's
kubeconfig, and a clear error naming the file and field when it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrl.k8s.kube import Client, KubeconfigError, kubeconfig_server

KUBELET_CONF = """
apiVersion: v1
kind: Config
clusters:
- name: other
  cluster: {server: "https://198.18.0.9:6443"}
- name: kubernetes
  cluster:
    certificate-authority-data: AAAA
    server: https://198.18.0.2:6443
contexts:
- name: system:node:n1@kubernetes
  context: {cluster: kubernetes, user: "system:node:n1"}
current-context: system:node:n1@kubernetes
users:
- name: system:node:n1
  user: {client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem}
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "kubelet.conf"
    p.write_text(text)
    return str(p)


def test_the_current_contexts_server_is_taken(tmp_path):
    assert kubeconfig_server(write(tmp_path, KUBELET_CONF)) == "https://198.18.0.2:6443"


def test_one_cluster_and_no_context_is_enough(tmp_path):
    text = "clusters:\n- name: k3s\n  cluster: {server: 'https://127.0.0.1:6444'}\n"
    assert kubeconfig_server(write(tmp_path, text)) == "https://127.0.0.1:6444"


@pytest.mark.parametrize(
    "text,message",
    [
        pytest.param(None, "No such file", id="missing"),
        pytest.param("[1, 2]", "not a kubeconfig", id="not-a-mapping"),
        pytest.param("a: [", "kubelet.conf", id="not-yaml"),
        pytest.param(
            KUBELET_CONF.replace("current-context: system:node:n1@kubernetes", "current-context: gone"),
            "current-context 'gone' is not among contexts",
            id="unknown-context",
        ),
        pytest.param(
            KUBELET_CONF.replace("server: https://198.18.0.2:6443", "server: 5"),
            "clusters['kubernetes'].cluster.server: 5 is not an https:// URL",
            id="server-not-a-url",
        ),
        pytest.param(
            "clusters:\n- {name: a, cluster: {server: 'https://a'}}\n- {name: b, cluster: {server: 'https://b'}}\n",
            "no current-context, and not exactly one cluster",
            id="ambiguous",
        ),
    ],
)
def test_a_kubeconfig_that_names_no_server_is_one_clear_error(tmp_path, text, message):
    path = str(tmp_path / "kubelet.conf") if text is None else write(tmp_path, text)
    with pytest.raises(KubeconfigError) as e:
        kubeconfig_server(path)
    assert message in str(e.value) and "kubelet.conf" in str(e.value)


def test_in_cluster_credentials_at_the_kubeconfigs_server(tmp_path, monkeypatch):
    # The ServiceAccount's token and CA, the kubelet's server address.
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    from kubernetes.config import incluster_config

    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(sa / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(sa / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "198.19.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    c = Client.from_config(None, server=kubeconfig_server(write(tmp_path, KUBELET_CONF)))
    assert c.server == "https://198.18.0.2:6443"
    c = Client.from_config(None)
    assert c.server == "https://198.19.0.1:443"
