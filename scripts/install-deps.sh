#!/usr/bin/env bash
# Installs the Debian packages sliceproxy needs to build, test and demo.
# Safe to run again: it installs only what is missing.
set -euo pipefail

pkgs=(clang llvm libbpf-dev libbpf1 bpftool iproute2 iptables linux-libc-dev python3-venv libyaml-dev util-linux openssl vagrant shellcheck)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		exit 1
	fi
	echo "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
