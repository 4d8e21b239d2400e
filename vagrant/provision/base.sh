#!/usr/bin/env bash
# Provisioning step 1 of 3 (vagrant/Vagrantfile): the VM's packages.
# Runs as root inside the VM; safe to run again.
set -euo pipefail
: "${SLICEPROXY_REPO:?set by the Vagrantfile}"
# shellcheck source=SCRIPTDIR/lib.sh
source "$SLICEPROXY_REPO/vagrant/provision/lib.sh"
require_root

export DEBIAN_FRONTEND=noninteractive
log "apt: make, podman (scripts/build-images.sh), jq (the smoke test), curl"
apt-get update -qq
apt-get install -y -qq ca-certificates curl jq make podman python3 iptables >/dev/null

# The compiler and libraries come from the repository's own list, the same
# one `make deps` installs on a developer's machine: clang, llvm,
# libbpf-dev, linux-libc-dev, bpftool...
log "scripts/install-deps.sh: clang, libbpf-dev and the rest of the repository's list"
bash "$SLICEPROXY_REPO/scripts/install-deps.sh"

# The DaemonSet pins its maps in the node's bpffs. systemd mounts it; this
# is the fallback for a box that does not.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
	log "mounting bpffs at /sys/fs/bpf"
	mount -t bpf bpf /sys/fs/bpf
fi
