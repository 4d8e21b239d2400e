#!/usr/bin/env bash
# Provisioning step 2 of 3 (vagrant/Vagrantfile): single-node k3s WITHOUT
# its kube-proxy, so that only sliceproxy serves Services.
# Runs as root inside the VM; safe to run again.
set -euo pipefail
: "${SLICEPROXY_REPO:?set by the Vagrantfile}" "${K3S_VERSION:?set by the Vagrantfile}"
# shellcheck source=SCRIPTDIR/lib.sh
source "$SLICEPROXY_REPO/vagrant/provision/lib.sh"
require_root

config=/etc/rancher/k3s/config.yaml
install -d -m 0755 /etc/rancher/k3s
new=$(mktemp)
trap 'rm -f "$new"' EXIT
cat >"$new" <<'CONF'
# Written by vagrant/provision/k3s.sh.
#
# sliceproxy replaces kube-proxy: k3s must not run its own, or its iptables
# rules would serve (and double-translate) the ClusterIPs.
disable-kube-proxy: true
# flannel with the bridge plugin: pods hang off cni0 through veth pairs
# whose host sides are named veth*, which is what the DaemonSet's
# --interfaces is set to (vagrant/provision/sliceproxy.sh).
flannel-backend: vxlan
# kube-router's NetworkPolicy firewall drops packets netfilter's conntrack
# calls INVALID. sliceproxy rewrites addresses before netfilter sees them,
# so conntrack tracks client->backend while the replies come back from the
# ClusterIP: INVALID to it. No NetworkPolicy is used here.
disable-network-policy: true
# Only what the smoke test needs. CoreDNS, metrics-server and the
# local-path provisioner reach the API server through the `kubernetes`
# ClusterIP, whose endpoint is this node's own address; sliceproxy does not
# yet translate replies that come from the node itself (see
# docs/local-vm.md), so they could not become ready.
disable:
  - traefik
  - servicelb
  - metrics-server
  - local-storage
  - coredns
# `vagrant ssh` then `kubectl ...` works without sudo (a throwaway VM).
write-kubeconfig-mode: "0644"
CONF

changed=false
if ! cmp -s "$new" "$config"; then
	install -m 0644 "$new" "$config"
	changed=true
fi

if [[ $(k3s --version 2>/dev/null || true) != *"version ${K3S_VERSION} "* ]]; then
	log "installing k3s ${K3S_VERSION} (get.k3s.io checks the binary's sha256)"
	installer=$(mktemp)
	trap 'rm -f "$new" "$installer"' EXIT
	curl -sSfL https://get.k3s.io -o "$installer"
	INSTALL_K3S_VERSION="$K3S_VERSION" sh "$installer"
elif $changed; then
	log "k3s configuration changed: restarting k3s"
	systemctl restart k3s
fi

node=$(hostname)
node_registered() {
	kubectl get node "$node" >/dev/null 2>&1
}
wait_for 300 "k3s to register node $node" node_registered
log "waiting for node $node to be Ready"
kubectl wait --for=condition=Ready "node/$node" --timeout=300s
kubectl get nodes -o wide
