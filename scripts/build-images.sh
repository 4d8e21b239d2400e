#!/usr/bin/env bash
# Builds the container images with podman, from nothing but Debian's package
# mirror and this repository: no registry is pulled from.
#
#   build-images.sh [sliceproxy]   the base images and sliceproxy's image
#   build-images.sh node           also the pause, agnhost, busybox and
#                                  regression-issue-74839 images the node
#                                  tier and the e2e tests run (needs
#                                  `scripts/build-k8s.sh node` first)
#   build-images.sh --ref NAME     build NAME if needed, then print
#                                  "<archive> <image name>" (tests use this)
#
# 1. Base images: `debootstrap --variant=minbase <suite>` into a root
#    filesystem, imported as docker.io/library/debian:<suite>; the same tree
#    with documentation, man pages and locales removed (as Debian's own slim
#    images) as debian:<suite>-slim. These are the FROM names
#    deploy/Containerfile uses.
# 2. sliceproxy: deploy/Containerfile, tagged localhost/sliceproxy:<key> and
#    sliceproxy:0.1.0. <key> hashes the Debian suite, the Containerfile and
#    every file the build copies, so a change to any of them makes a new
#    image and an unchanged tree reuses the cached one.
# 3. pause: build/pause/linux/pause.c of the pinned Kubernetes module,
#    compiled static, in a FROM scratch image named exactly as containerd's
#    sandbox_image and the e2e framework ask (registry.k8s.io/pause:<tag>).
# 4. agnhost: the binary build-k8s.sh made, in a Debian image named as the
#    e2e framework asks (registry.k8s.io/e2e-test-images/agnhost:<version>);
#    likewise regression-issue-74839 (a conntrack e2e test's server), and
#    busybox from Debian's busybox-static, tagged as the framework's
#    test/utils/image/manifest.go names them.
#
# Everything is cached outside the repository, in
# ${SLICEPROXY_IMAGE_CACHE:-/var/cache/sliceproxy/images}: the root
# filesystem tarballs, podman's own image store (podman/), and one
# docker-archive per image (<name>-<key>.tar, what `ctr images import`
# reads). A second run with nothing changed builds nothing.
#
# podman runs with the settings in scripts/podman/ (runc, cgroupfs, rlimits
# it may set, the host network for build steps), never the machine's /etc.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/debian.sh
source "$here/lib/debian.sh"

suite=bookworm
mirror=${SLICEPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
k8s_version=$(tr -d '[:space:]' <"$here/k8s-version")
k8s_out=${SLICEPROXY_K8S_CACHE:-/var/cache/sliceproxy}/k8s-$k8s_version
cache=${SLICEPROXY_IMAGE_CACHE:-${SLICEPROXY_K8S_CACHE:-/var/cache/sliceproxy}/images}
runroot=/run/sliceproxy-podman

log() { printf 'build-images: %s\n' "$*" >&2; }
die() {
	printf 'build-images: %s\n' "$*" >&2
	exit 1
}

ref_only=
case "${1:-}" in
--ref)
	[[ $# -eq 2 ]] || die "usage: build-images.sh --ref sliceproxy|pause|agnhost"
	ref_only=$2
	targets=("$2")
	;;
"" | sliceproxy) targets=(sliceproxy) ;;
node) targets=(sliceproxy pause agnhost busybox regression) ;;
*) die "unknown target '$1' (sliceproxy, node, --ref NAME)" ;;
esac

export CONTAINERS_CONF=$here/podman/containers.conf
export CONTAINERS_REGISTRIES_CONF=$here/podman/registries.conf
export CONTAINERS_STORAGE_CONF=$here/podman/storage.conf
pm() { podman --root "$cache/podman" --runroot "$runroot" --storage-driver overlay "$@"; }

mkdir -p "$cache"
# One build at a time per cache: parallel test sessions ask for the same
# images and must not build them twice into one store.
exec 9>"$cache/.lock"
flock 9

work=$(mktemp -d "${TMPDIR:-/tmp}/sliceproxy-images.XXXXXX")
cleanup() {
	# debootstrap leaves /proc and friends mounted in the tree when it fails
	# half-way; unmount before removing.
	if [[ -d $work/rootfs ]]; then
		grep -o " $work/rootfs[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	fi
	rm -rf "$work"
	# The cgroups runc and conmon made for build steps, in every hierarchy
	# (podman leaves a parent behind otherwise), children first.
	local h
	for h in /sys/fs/cgroup/*/"$cgroup_parent" /sys/fs/cgroup/"$cgroup_parent"; do
		[[ -d $h ]] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
	done
	return 0
}
cgroup_parent=sliceproxy-build-$$
trap cleanup EXIT

sha_files() { # the sha256 of a list of files (names and contents), from stdin
	local f
	while IFS= read -r f; do
		printf '%s %s\n' "$(sha256sum <"$repo/$f" | cut -d' ' -f1)" "$f"
	done | sha256sum | cut -c1-16
}

ensure_tools() {
	local pkgs=(podman buildah runc uidmap fuse-overlayfs debootstrap)
	apt_ensure build-images "${pkgs[@]}"
}

# -- 1. base images ----------------------------------------------------------

base_tar=$cache/debian-$suite-minbase.tar
slim_tar=$cache/debian-$suite-slim.tar

make_base_tars() {
	[[ -s $base_tar && -s $slim_tar ]] && return
	local t0=$SECONDS root=$work/rootfs
	log "debootstrap --variant=minbase $suite from $mirror"
	debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		die "debootstrap failed; last lines:
$(tail -n 20 "$work/debootstrap.log")"
	rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
	tar -C "$root" --numeric-owner -cf "$base_tar.tmp" .
	mv "$base_tar.tmp" "$base_tar"
	# slim: what Debian's -slim images drop, and a dpkg rule so packages
	# installed later do not bring it back.
	rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
		"$root"/usr/share/locale/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/*
	cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<-'EOF'
		path-exclude /usr/share/doc/*
		path-include /usr/share/doc/*/copyright
		path-exclude /usr/share/man/*
		path-exclude /usr/share/info/*
		path-exclude /usr/share/locale/*
		path-exclude /usr/share/groff/*
		path-exclude /usr/share/lintian/*
	EOF
	tar -C "$root" --numeric-owner -cf "$slim_tar.tmp" .
	mv "$slim_tar.tmp" "$slim_tar"
	log "base root filesystems made in $((SECONDS - t0))s"
}

# import_base TAR NAME: (re)import when the store lacks NAME or holds an
# import of another tarball (a stamp records which).
import_base() {
	local tar=$1 name=$2 stamp sum
	stamp="$cache/podman/.import-${name//[\/:]/_}"
	sum=$(sha256sum <"$tar" | cut -c1-16)
	if pm image exists "docker.io/library/$name" && [[ -f $stamp && $(<"$stamp") == "$sum" ]]; then
		return
	fi
	log "importing $tar as $name"
	pm import --quiet "$tar" "docker.io/library/$name" >/dev/null
	echo "$sum" >"$stamp"
}

ensure_bases() {
	make_base_tars
	mkdir -p "$cache/podman"
	import_base "$base_tar" "debian:$suite"
	import_base "$slim_tar" "debian:$suite-slim"
}

base_key() { cat "$cache/podman/.import-debian_${suite}" "$cache/podman/.import-debian_${suite}-slim" 2>/dev/null; }

# -- building and saving -----------------------------------------------------

# build_image NAME FULLREF ARCHIVE CONTAINERFILE CONTEXT [podman build args]
build_image() {
	local name=$1 ref=$2 archive=$3 file=$4 context=$5
	shift 5
	local t0=$SECONDS
	log "building $ref"
	pm build --quiet --pull=never --network host --layers=false --cgroup-parent "/$cgroup_parent" \
		-f "$file" -t "$ref" "$@" "$context" >"$work/$name.id" 2>"$work/$name.log" ||
		die "podman build of $ref failed; last lines:
$(tail -n 30 "$work/$name.log")"
	rm -f "$archive.tmp"
	pm save --quiet --format docker-archive -o "$archive.tmp" "$ref"
	mv "$archive.tmp" "$archive"
	log "built $ref in $((SECONDS - t0))s: $archive"
}

# The machine's CA bundle, mounted into build steps for pip (HTTPS), for
# machines whose egress re-signs TLS with a CA of their own; pip in the
# image reads it through /etc/pip.conf during the build only.
host_ca_args() {
	local bundle=/etc/ssl/certs/ca-certificates.crt
	[[ -s $bundle ]] || return 0
	printf '[global]\ncert = /etc/sliceproxy-build-ca.crt\n' >"$work/pip.conf"
	printf '%s\n' -v "$bundle:/etc/sliceproxy-build-ca.crt:ro" -v "$work/pip.conf:/etc/pip.conf:ro"
}

# Each tree built leaves an archive of some 400 MB: keep the newest three
# (other checkouts of the repository may still want theirs) and drop the
# rest, archive and image.
prune_sliceproxy() {
	local keep=$1 old
	while IFS= read -r old; do
		[[ $old == "$keep" ]] && continue
		rm -f "$old"
		old=${old##*/sliceproxy-}
		pm rmi --force "localhost/sliceproxy:${old%.tar}" >/dev/null 2>&1 || true
	done < <(find "$cache" -maxdepth 1 -name 'sliceproxy-*.tar' -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2-)
}

sliceproxy_key() {
	{
		echo "suite $suite"
		base_key
		(cd "$repo" && find deploy/Containerfile .containerignore Makefile pyproject.toml README.md ctrl ebpf \
			-type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort | sha_files)
	} | sha256sum | cut -c1-16
}

ensure_sliceproxy() {
	local key archive ref
	key=$(sliceproxy_key)
	ref="localhost/sliceproxy:$key"
	archive="$cache/sliceproxy-$key.tar"
	if [[ ! -s $archive ]] || ! pm image exists "$ref"; then
		local ca
		mapfile -t ca < <(host_ca_args)
		build_image sliceproxy "$ref" "$archive" "$repo/deploy/Containerfile" "$repo" "${ca[@]}"
		pm tag "$ref" localhost/sliceproxy:0.1.0
		prune_sliceproxy "$archive"
	fi
	echo "$archive $ref"
}

pause_tag() { sed -n 's/^TAG ?= *\([0-9.]*\)$/\1/p' "$moddir/build/pause/Makefile"; }

k8s_moddir() {
	# The module source build-k8s.sh downloaded (in Go's module cache).
	command -v go >/dev/null || die "the go command is needed to find the Kubernetes module source"
	local dir
	dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$k8s_version" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	[[ -n $dir && -d $dir ]] || die "no module directory for k8s.io/kubernetes@$k8s_version"
	echo "$dir"
}

ensure_pause() {
	local tag key archive ref src=$moddir/build/pause/linux/pause.c
	tag=$(pause_tag)
	[[ -n $tag ]] || die "no TAG in $moddir/build/pause/Makefile"
	ref="registry.k8s.io/pause:$tag"
	key=$( (
		echo "$k8s_version $tag"
		sha256sum <"$src"
		sha256sum <"$here/images/pause.Containerfile"
	) | sha256sum | cut -c1-16)
	archive="$cache/pause-$tag-$key.tar"
	if [[ ! -s $archive ]] || ! pm image exists "$ref"; then
		mkdir -p "$work/pause"
		# The flags of build/pause/Makefile.
		gcc -Os -Wall -Werror -static -DVERSION="v$tag-$k8s_version" -o "$work/pause/pause" "$src"
		build_image pause "$ref" "$archive" "$here/images/pause.Containerfile" "$work/pause"
	fi
	echo "$archive $ref"
}

ensure_agnhost() {
	local version key archive ref bin=$k8s_out/agnhost
	[[ -x $bin ]] || die "$bin is missing: run scripts/build-k8s.sh node first"
	version=$(tr -d '[:space:]' <"$moddir/test/images/agnhost/VERSION")
	ref="registry.k8s.io/e2e-test-images/agnhost:$version"
	key=$( (
		echo "suite $suite"
		base_key
		sha256sum <"$bin"
		sha256sum <"$here/images/agnhost.Containerfile"
	) | sha256sum | cut -c1-16)
	archive="$cache/agnhost-$version-$key.tar"
	if [[ ! -s $archive ]] || ! pm image exists "$ref"; then
		mkdir -p "$work/agnhost"
		cp "$bin" "$work/agnhost/agnhost"
		build_image agnhost "$ref" "$archive" "$here/images/agnhost.Containerfile" "$work/agnhost"
	fi
	echo "$archive $ref"
}

# The tag the e2e framework asks for, from test/utils/image/manifest.go.
manifest_tag() {
	sed -n "s/^[[:space:]]*configs\[$1\] = Config{[^,]*, \"[^\"]*\", \"\([^\"]*\)\"}.*/\1/p" \
		"$moddir/test/utils/image/manifest.go"
}

ensure_busybox() {
	local tag key archive ref
	tag=$(manifest_tag BusyBox)
	[[ -n $tag ]] || die "no BusyBox tag in the module's test/utils/image/manifest.go"
	ref="registry.k8s.io/e2e-test-images/busybox:$tag"
	key=$( (
		echo "suite $suite"
		base_key
		sha256sum <"$here/images/busybox.Containerfile"
	) | sha256sum | cut -c1-16)
	archive="$cache/busybox-$tag-$key.tar"
	if [[ ! -s $archive ]] || ! pm image exists "$ref"; then
		mkdir -p "$work/busybox"
		build_image busybox "$ref" "$archive" "$here/images/busybox.Containerfile" "$work/busybox"
	fi
	echo "$archive $ref"
}

ensure_regression() {
	local tag key archive ref bin=$k8s_out/regression-issue-74839
	[[ -x $bin ]] || die "$bin is missing: run scripts/build-k8s.sh node first"
	tag=$(manifest_tag RegressionIssue74839)
	[[ -n $tag ]] || die "no RegressionIssue74839 tag in the module's test/utils/image/manifest.go"
	ref="registry.k8s.io/e2e-test-images/regression-issue-74839:$tag"
	key=$( (
		echo "suite $suite"
		base_key
		sha256sum <"$bin"
		sha256sum <"$here/images/regression.Containerfile"
	) | sha256sum | cut -c1-16)
	archive="$cache/regression-issue-74839-$tag-$key.tar"
	if [[ ! -s $archive ]] || ! pm image exists "$ref"; then
		mkdir -p "$work/regression"
		cp "$bin" "$work/regression/regression-issue-74839"
		build_image regression "$ref" "$archive" "$here/images/regression.Containerfile" "$work/regression"
	fi
	echo "$archive $ref"
}

ensure_tools
start=$SECONDS
needs_k8s=
for t in "${targets[@]}"; do
	case $t in
	pause | agnhost | busybox | regression) needs_k8s=1 ;;
	sliceproxy) ;;
	*) die "unknown image '$t' (sliceproxy, pause, agnhost, busybox, regression)" ;;
	esac
done
[[ -n $needs_k8s ]] && moddir=$(k8s_moddir)
ensure_bases
for t in "${targets[@]}"; do
	line=$("ensure_$t")
	if [[ -n $ref_only ]]; then
		echo "$line"
	else
		log "ready: $line"
	fi
done
[[ -n $ref_only ]] || log "done in $((SECONDS - start))s"
