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

# k3s's kubelet kubeconfig: the agent reads the API server's address from
# it (--api-server-from; see adapt_daemonset.py).
KUBELET_KUBECONFIG=/var/lib/rancher/k3s/agent/kubelet.kubeconfig
# Host sides of flannel's pod veths (vagrant/provision/k3s.sh).
POD_INTERFACES='veth*'
STATE=/var/lib/sliceproxy-vm

# The same Makefile rules the image's build stage runs. Here they fail
# fast, before a long image build, and leave build/sliceproxy_tc.bpf.o and
# build/libsliceproxy.so for `make datapath` / `make netns` inside the VM.
log "make bpf native"
make bpf native

# The image nodes run: deploy/Containerfile built by scripts/build-images.sh,
# the same build `make image` and the node tier (tests/node) use: base images
# made with debootstrap, podman with the repository's own settings, the
# result cached by what it is built from. It prints the archive and the
# image's name; the name's tag is that key, so an unchanged tree keeps its
# tag (the apply below is a no-op) and a changed one rolls the DaemonSet.
log "scripts/build-images.sh (deploy/Containerfile)"
read -r archive image < <(bash scripts/build-images.sh --ref sliceproxy)
[[ -s $archive && -n $image ]] || die "scripts/build-images.sh printed no image"

# k3s runs its own containerd, which does not see podman's storage: hand
# the image over as the archive the build saved.
k3s_has_image() {
	# The list first, then grep: `ctr | grep -q` could fail on SIGPIPE.
	local images
	images=$(k3s ctr -n k8s.io images ls -q)
	grep -Fxq "$1" <<<"$images"
}
if ! k3s_has_image "$image"; then
	log "importing $image into k3s's containerd"
	k3s ctr -n k8s.io images import "$archive"
	k3s_has_image "$image" || die "k3s ctr import finished but containerd does not list $image"
fi

# The repository's manifests, as they are: RBAC unchanged, the DaemonSet
# with the VM's image, interfaces, kubelet kubeconfig and AppArmor profile
# (adapt_daemonset.py says why for each). The rendered copy stays in
# $STATE for inspection.
log "kubectl apply -f deploy/rbac.yaml"
kubectl apply -f deploy/rbac.yaml

log "kubectl apply deploy/daemonset.yaml (image $image, --interfaces=$POD_INTERFACES)"
install -d -m 0755 "$STATE"
kubectl create --dry-run=client -o json -f deploy/daemonset.yaml |
	python3 vagrant/provision/adapt_daemonset.py \
		--image "$image" --interfaces "$POD_INTERFACES" --kubelet-kubeconfig "$KUBELET_KUBECONFIG" \
		>"$STATE/daemonset.json.new"
mv "$STATE/daemonset.json.new" "$STATE/daemonset.json"
kubectl apply -f "$STATE/daemonset.json"

if ! kubectl -n kube-system rollout status ds/sliceproxy --timeout=300s; then
	sliceproxy_diagnostics
	die "the sliceproxy DaemonSet did not become ready (diagnostics above)"
fi
kubectl -n kube-system get pods -l app.kubernetes.io/name=sliceproxy -o wide
log "sliceproxy is serving; run the smoke test with: make vagrant-test"
