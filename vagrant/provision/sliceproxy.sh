#!/usr/bin/env bash
# Provisioning step 3 of 3 (vagrant/Vagrantfile): build sliceproxy inside
# the VM and deploy the repository's own manifests on k3s. Runs as root
# inside the VM; run again after a code change (`make vagrant-redeploy`):
# an unchanged tree rebuilds from cache and changes nothing, a changed one
# gets a new image tag and a rolling update.
set -euo pipefail
: "${SLICEPROXY_REPO:?set by the Vagrantfile}"
# shellcheck source=SCRIPTDIR/lib.sh
source "$SLICEPROXY_REPO/vagrant/provision/lib.sh"
require_root
cd "$SLICEPROXY_REPO"

# The API server's address for the agent (see adapt_daemonset.py): k3s
# serves it on the node's loopback, which a host-network pod shares.
API_SERVER=127.0.0.1:6443
# Host sides of flannel's pod veths (vagrant/provision/k3s.sh).
POD_INTERFACES='veth*'
STATE=/var/lib/sliceproxy-vm

# The same Makefile rule the image's build stage runs. Here it fails fast,
# before a long image build, and leaves build/sliceproxy_tc.bpf.o for
# `make datapath` / `make netns` inside the VM.
log "make bpf"
make bpf

# The image nodes run, from deploy/Containerfile as documented in
# docs/running-on-kubernetes.md. --network host: the build's apt and pip
# steps use the VM's network, no podman CNI network needed.
log "podman build -f deploy/Containerfile"
podman build --network host -f deploy/Containerfile -t localhost/sliceproxy:vm-build .

# Tag by image id: an unchanged tree keeps its tag (apply is a no-op), a
# changed one gets a new tag, so the apply below rolls the DaemonSet.
id=$(podman image inspect --format '{{.Id}}' localhost/sliceproxy:vm-build)
id=${id#sha256:}
image="docker.io/library/sliceproxy:vm-${id:0:12}"
podman tag localhost/sliceproxy:vm-build "$image"

# k3s runs its own containerd, which does not see podman's storage: hand
# the image over as an archive.
k3s_has_image() {
	# The list first, then grep: `ctr | grep -q` could fail on SIGPIPE.
	local images
	images=$(k3s ctr -n k8s.io images ls -q)
	grep -Fxq "$1" <<<"$images"
}
if ! k3s_has_image "$image"; then
	log "importing $image into k3s's containerd"
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	podman save --format docker-archive -o "$work/sliceproxy.tar" "$image"
	k3s ctr -n k8s.io images import "$work/sliceproxy.tar"
	k3s_has_image "$image" || die "k3s ctr import finished but containerd does not list $image"
fi

# The repository's manifests, as they are: RBAC unchanged, the DaemonSet
# with the VM's image, interfaces, API address and AppArmor profile
# (adapt_daemonset.py says why for each). The rendered copy stays in
# $STATE for inspection.
log "kubectl apply -f deploy/rbac.yaml"
kubectl apply -f deploy/rbac.yaml

log "kubectl apply deploy/daemonset.yaml (image $image, --interfaces=$POD_INTERFACES)"
install -d -m 0755 "$STATE"
kubectl create --dry-run=client -o json -f deploy/daemonset.yaml |
	python3 vagrant/provision/adapt_daemonset.py \
		--image "$image" --interfaces "$POD_INTERFACES" --api-server "$API_SERVER" \
		>"$STATE/daemonset.json.new"
mv "$STATE/daemonset.json.new" "$STATE/daemonset.json"
kubectl apply -f "$STATE/daemonset.json"

if ! kubectl -n kube-system rollout status ds/sliceproxy --timeout=300s; then
	sliceproxy_diagnostics
	die "the sliceproxy DaemonSet did not become ready (diagnostics above)"
fi
kubectl -n kube-system get pods -l app.kubernetes.io/name=sliceproxy -o wide
log "sliceproxy is serving; run the smoke test with: make vagrant-test"
