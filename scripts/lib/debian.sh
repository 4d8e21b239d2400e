# shellcheck shell=bash
# Sourced by the install scripts: Debian packages, installed only when missing.

# apt_ensure WHO PACKAGE...: install the packages not yet installed (as root;
# otherwise name them and fail). WHO prefixes the messages.
apt_ensure() {
	local who=$1
	shift
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	if [[ $(id -u) -ne 0 ]]; then
		echo "$who: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		return 1
	fi
	echo "$who: installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
