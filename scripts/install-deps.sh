#!/usr/bin/env bash
# Installs the Debian packages sliceproxy needs to build, test, benchmark and
# demo: podman, buildah and debootstrap build the images; containerd, runc
# and the CNI plugins run the node tier's kubelet. Safe to run again: it
# installs only what is missing. python3-bpfcc and the kernel headers are
# for `sliceproxy trace` only (bcc compiles its tap on the node; any
# version of Debian's headers serves, see docs/inspecting.md).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/debian.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian.sh"

apt_ensure install-deps clang llvm libbpf-dev libbpf1 bpftool iproute2 iptables nftables linux-libc-dev \
	python3-venv libyaml-dev util-linux openssl vagrant shellcheck \
	podman buildah runc uidmap fuse-overlayfs debootstrap containerd containernetworking-plugins conntrack gcc libc6-dev \
	python3-bpfcc "linux-headers-$(dpkg --print-architecture)"
