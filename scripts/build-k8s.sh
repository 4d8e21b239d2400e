#!/usr/bin/env bash
# Builds Kubernetes binaries from the k8s.io/kubernetes Go module, at the
# release pinned in scripts/k8s-version, into a cache outside the repository:
#
#   ${SLICEPROXY_K8S_CACHE:-/var/cache/sliceproxy}/k8s-<version>/
#
#   build-k8s.sh            kube-apiserver, kube-controller-manager (tests/cluster)
#   build-k8s.sh node       the above, and kube-scheduler, kubelet, kube-proxy,
#                           kubectl, e2e.test, agnhost, regression-issue-74839
#                           (an e2e test server) and coredns (tests/node,
#                           make e2e; coredns at the version kubeadm of the
#                           same release deploys, its own Go module)
#   build-k8s.sh NAME...    just those
#
# and makes sure an etcd binary is there (Debian's etcd-server package).
# Safe to run again: a binary that exists and reports the pinned version is
# not rebuilt. The first build of the control plane takes 10-30 minutes on
# 2 cores; the node set adds about as much again (e2e.test is the largest).
#
# Why a temporary module: k8s.io/kubernetes's go.mod points its staging
# modules (k8s.io/api, k8s.io/client-go, ...) at ./staging/src/..., which the
# module zip does not contain, and requires them at v0.0.0. A main module of
# our own maps each of them to its published v0.<minor>.<patch> twin, so the
# plain Go module proxy is enough to build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/debian.sh
source "$here/lib/debian.sh"
version=$(tr -d '[:space:]' <"$here/k8s-version")
if [[ ! $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]; then
	echo "build-k8s: scripts/k8s-version holds '$version', want v1.<minor>.<patch>" >&2
	exit 1
fi
staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
cache=${SLICEPROXY_K8S_CACHE:-/var/cache/sliceproxy}
out="$cache/k8s-$version"
control_plane=(kube-apiserver kube-controller-manager)
node_set=(kube-scheduler kubelet kube-proxy kubectl e2e.test agnhost regression-issue-74839 coredns)
# agnhost's version is the tag the e2e framework asks for
# (test/utils/image/manifest.go); scripts/build-images.sh tags its image so.
case "${1:-}" in
"") bins=("${control_plane[@]}") ;;
node) bins=("${control_plane[@]}" "${node_set[@]}") ;;
*) bins=("$@") ;;
esac
for b in "${bins[@]}"; do
	case " ${control_plane[*]} ${node_set[*]} " in
	*" $b "*) ;;
	*)
		echo "build-k8s: unknown binary '$b' (know: ${control_plane[*]} ${node_set[*]})" >&2
		exit 1
		;;
	esac
done

log() { printf 'build-k8s: %s\n' "$*"; }

# A binary counts as built when it runs and prints the pinned version, or,
# for those with no such flag (kubectl, e2e.test, agnhost), when the stamp
# written after a complete build names the pinned version.
is_built() {
	local b=$1
	[[ -x "$out/$b" ]] || return 1
	if [[ -f "$out/.$b.version" ]]; then
		[[ $(<"$out/.$b.version") == "$version" ]]
		return
	fi
	local v
	v=$("$out/$b" --version 2>/dev/null) || return 1
	[[ $v == "Kubernetes $version" ]]
}

ensure_etcd() {
	if command -v etcd >/dev/null 2>&1; then
		log "etcd: $(command -v etcd) ($(etcd --version 2>/dev/null | head -n1))"
		return
	fi
	apt_ensure build-k8s etcd-server
	# The package ships a service that may start on install and would hold
	# 127.0.0.1:2379. The tests start their own etcd on random ports and need
	# no system one: stop and disable it.
	if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
		systemctl stop etcd.service 2>/dev/null || true
		systemctl disable etcd.service 2>/dev/null || true
	elif [[ -x /etc/init.d/etcd ]]; then
		/etc/init.d/etcd stop >/dev/null 2>&1 || true
	fi
	log "etcd: $(command -v etcd) ($(etcd --version 2>/dev/null | head -n1))"
}

ensure_etcd

missing=()
for b in "${bins[@]}"; do
	is_built "$b" || missing+=("$b")
done
if ((${#missing[@]} == 0)); then
	log "kubernetes $version already built in $out"
	exit 0
fi

if ! command -v go >/dev/null 2>&1; then
	echo "build-k8s: the go command is needed to build ${missing[*]}" >&2
	exit 1
fi

start=$SECONDS
export GOFLAGS=-mod=mod
# Work, and run every go command, in a scratch dir: a go.mod in the caller's
# directory must neither steer nor be touched by the downloads below.
work=$(mktemp -d "${TMPDIR:-/tmp}/sliceproxy-k8s-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

log "downloading k8s.io/kubernetes@$version"
info=$(go mod download -json "k8s.io/kubernetes@$version")
moddir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")
commit=$(sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]*\)",\{0,1\}$/\1/p' <<<"$info" | head -n1)
if [[ -z $moddir || ! -f "$moddir/go.mod" ]]; then
	echo "build-k8s: go mod download gave no module directory for k8s.io/kubernetes@$version" >&2
	exit 1
fi

# The staging modules are the ones k8s.io/kubernetes replaces with a path
# under ./staging/src; take the list from its own go.mod, so a new release's
# new staging module needs no edit here.
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*#\1#p' "$moddir/go.mod" | sort -u)
if ((${#staging[@]} == 0)); then
	echo "build-k8s: found no staging modules in $moddir/go.mod" >&2
	exit 1
fi
go_line=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$moddir/go.mod")

replaces=()
for m in "${staging[@]}"; do
	# A staging module the proxy does not serve (sample-* code, say) is left
	# out; the build fails clearly later if one of them was needed after all.
	if go mod download "$m@$staging_version" >/dev/null 2>&1; then
		replaces+=("$m => $m $staging_version")
	else
		log "skipping $m@$staging_version: not served by the module proxy"
	fi
done
log "${#replaces[@]} of ${#staging[@]} staging modules mapped to $staging_version"

{
	echo "module sliceproxy.invalid/k8sbuild"
	echo
	echo "go ${go_line:-1.25.0}"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	printf '\t%s\n' "${replaces[@]}"
	echo ")"
} >"$work/go.mod"

# The same version stamps Kubernetes' own build (hack/lib/version.sh) sets;
# `--version` prints them and the apiserver's /version serves them.
minor=${version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$version"
	ldflags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitCommit=${commit:-unknown} -X $pkg.gitTreeState=clean"
	ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

moddir_agnhost="$moddir/test/images/agnhost"
mkdir -p "$out"
for b in "${missing[@]}"; do
	log "building $b $version (this takes a while; GOMAXPROCS=$(nproc))"
	t0=$SECONDS
	case $b in
	e2e.test)
		# The e2e suite is a test binary: `go test -c` of test/e2e, as
		# Kubernetes' own build makes it.
		go test -c -trimpath -ldflags "$ldflags" -o "$work/$b" k8s.io/kubernetes/test/e2e
		;;
	coredns)
		# Cluster DNS for the test nodes: CoreDNS is a Go module of its own,
		# installed at the version kubeadm of this release deploys.
		coredns_version=$(sed -n 's/^[[:space:]]*CoreDNSVersion = "\(v[0-9.]*\)"$/\1/p' \
			"$moddir/cmd/kubeadm/app/constants/constants.go")
		[[ -n $coredns_version ]] || {
			echo "build-k8s: no CoreDNSVersion in the module's kubeadm constants" >&2
			exit 1
		}
		GOBIN="$work/gobin" GOFLAGS='' go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$coredns_version"
		mv -f "$work/gobin/coredns" "$work/$b"
		;;
	regression-issue-74839)
		go build -trimpath -ldflags "-s -w" -o "$work/$b" k8s.io/kubernetes/test/images/regression-issue-74839
		;;
	agnhost)
		go build -trimpath -ldflags "-s -w -X main.Version=$(tr -d '[:space:]' <"$moddir_agnhost/VERSION")" \
			-o "$work/$b" k8s.io/kubernetes/test/images/agnhost
		;;
	*)
		go build -trimpath -ldflags "$ldflags" -o "$work/$b" "k8s.io/kubernetes/cmd/$b"
		;;
	esac
	# Move into place only when complete, so an interrupted build never
	# leaves a half-written binary in the cache; the stamp comes last.
	mv -f "$work/$b" "$out/$b"
	echo "$version" >"$out/.$b.version"
	log "built $out/$b in $((SECONDS - t0))s"
done

for b in "${bins[@]}"; do
	if ! is_built "$b"; then
		echo "build-k8s: $out/$b does not report Kubernetes $version" >&2
		exit 1
	fi
done
log "done in $((SECONDS - start))s: ${bins[*]} in $out"
