# Helpers shared by the provisioning scripts and the smoke test, sourced
# from the repository copy inside the VM ($SLICEPROXY_REPO). Vagrant uploads
# each provisioning script on its own, so they cannot source a neighbour by
# relative path; the synced repository is already in place when they run.
# shellcheck shell=bash

# k3s's installer puts k3s (and kubectl) in /usr/local/bin, which a
# provisioning shell's PATH may lack.
case ":$PATH:" in
*:/usr/local/bin:*) ;;
*) PATH=$PATH:/usr/local/bin ;;
esac

# The kubeconfig k3s writes for root; k3s's kubectl would find it too, but
# saying so keeps the scripts independent of which kubectl is first in PATH.
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

log() {
	printf '==> %s\n' "$*"
}

die() {
	printf 'ERROR: %s\n' "$*" >&2
	exit 1
}

require_root() {
	[[ $(id -u) -eq 0 ]] || die "run as root (sudo $0)"
}

kubectl() {
	k3s kubectl "$@"
}

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND every 2 s until it
# succeeds; fail naming DESCRIPTION when SECONDS have passed.
wait_for() {
	local timeout=$1 what=$2
	shift 2
	local deadline=$((SECONDS + timeout))
	until "$@"; do
		if ((SECONDS >= deadline)); then
			die "timed out after ${timeout}s waiting for ${what}"
		fi
		sleep 2
	done
}

# What an operator would look at first when the DaemonSet does not come up.
sliceproxy_diagnostics() {
	echo "--- sliceproxy pods" >&2
	kubectl -n kube-system get pods -l app.kubernetes.io/name=sliceproxy -o wide >&2 || true
	kubectl -n kube-system describe pods -l app.kubernetes.io/name=sliceproxy >&2 || true
	echo "--- sliceproxy logs (last 50 lines)" >&2
	kubectl -n kube-system logs ds/sliceproxy --tail=50 >&2 || true
}
