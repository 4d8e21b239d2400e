#!/usr/bin/env bash
# The VM's smoke test (`make vagrant-test` runs it inside the VM as root):
# a ClusterIP Service answers through sliceproxy on k3s without kube-proxy.
#
#  1. kube-proxy is absent: k3s is configured without it and no KUBE-SERVICES
#     chain exists, so nothing but sliceproxy can translate a ClusterIP.
#  2. The sliceproxy DaemonSet is ready.
#  3. vagrant/smoke/web.yaml: two agnhost netexec pods behind Service web
#     (80/TCP -> 8080, 8081/UDP -> 8081) and a client pod.
#  4. `sliceproxy dump` (run in the agent's pod) lists both frontends with
#     exactly the two pods' addresses as backends.
#  5. From the client pod: 20 HTTP requests to the ClusterIP are answered,
#     by both pods; a UDP request is answered from the ClusterIP (agnhost
#     connect uses a connected socket, so a reply whose source was not
#     rewritten back would never arrive).
#  6. sliceproxy's dnat_new counter grew by at least the number of new flows.
#
# Exits non-zero with the failing step's reason. The namespace is deleted at
# the end unless SMOKE_KEEP=1.
set -euo pipefail
REPO=${SLICEPROXY_REPO:-/home/vagrant/sliceproxy}
# shellcheck source=SCRIPTDIR/provision/lib.sh
source "$REPO/vagrant/provision/lib.sh"
require_root

NS=sliceproxy-smoke
REQUESTS=20

cleanup() {
	if [[ ${SMOKE_KEEP:-0} != 1 ]]; then
		kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
	fi
}

dump() {
	kubectl -n kube-system exec ds/sliceproxy -- sliceproxy dump "$@"
}

# The backends `sliceproxy dump` lists for frontend $1, one per line, sorted.
dump_backends() {
	dump --json | jq -r --arg fe "$1" '.services[] | select(.frontend == $fe) | .backends[]' | sort
}

dump_shows() {
	[[ "$(dump_backends "$1")" == "$2" ]]
}

dnat_new() {
	dump --json | jq -r '.counters.dnat_new.packets // error("no dnat_new counter in the dump")'
}

log "1. kube-proxy is absent"
grep -qx 'disable-kube-proxy: true' /etc/rancher/k3s/config.yaml ||
	die "/etc/rancher/k3s/config.yaml does not disable kube-proxy (rerun: vagrant provision --provision-with k3s)"
if iptables -t nat -S KUBE-SERVICES >/dev/null 2>&1; then
	die "iptables has kube-proxy's KUBE-SERVICES chain: something else serves ClusterIPs here"
fi
echo "k3s runs with disable-kube-proxy; no KUBE-SERVICES chain in the nat table"

log "2. the sliceproxy DaemonSet is ready"
if ! kubectl -n kube-system rollout status ds/sliceproxy --timeout=120s; then
	sliceproxy_diagnostics
	die "the sliceproxy DaemonSet is not ready (run: make vagrant-redeploy)"
fi

log "3. a Service with two backends, and a client pod"
if kubectl get namespace "$NS" >/dev/null 2>&1; then
	kubectl delete namespace "$NS" --timeout=120s
fi
trap cleanup EXIT
kubectl apply -f "$REPO/vagrant/smoke/web.yaml"
kubectl -n "$NS" rollout status deploy/web --timeout=300s
kubectl -n "$NS" wait --for=condition=Ready pod/client --timeout=300s
vip=$(kubectl -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
pod_ips=$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}')
pod_names=$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
[[ $(wc -l <<<"$pod_ips") -eq 2 ]] || die "expected 2 web pods, got: $pod_ips"
echo "Service web: ClusterIP $vip; pods: $(tr '\n' ' ' <<<"$pod_names")"

log "4. sliceproxy dump lists the Service with both pods"
want_tcp=$(awk '{print $0 ":8080"}' <<<"$pod_ips" | sort)
want_udp=$(awk '{print $0 ":8081"}' <<<"$pod_ips" | sort)
wait_for 60 "sliceproxy dump to list $vip:80/TCP -> $(tr '\n' ' ' <<<"$want_tcp")" dump_shows "$vip:80/TCP" "$want_tcp"
wait_for 60 "sliceproxy dump to list $vip:8081/UDP -> $(tr '\n' ' ' <<<"$want_udp")" dump_shows "$vip:8081/UDP" "$want_udp"
dump | grep -F "$NS/web"

log "5. the client pod calls the ClusterIP"
before=$(dnat_new) || die "cannot read sliceproxy dump --json"
# One connection per request: each is a new flow and picks a backend anew.
# shellcheck disable=SC2016 # $i and $(seq) expand in the pod's shell
answers=$(kubectl -n "$NS" exec client -- sh -c \
	'for i in $(seq "$1"); do curl -sS --max-time 5 "http://$2/hostname" || exit 1; echo; done' \
	sh "$REQUESTS" "$vip") || die "an HTTP request to http://$vip/hostname failed"
while read -r who; do
	grep -qxF "$who" <<<"$pod_names" || die "unexpected HTTP answer from $vip: '$who'"
done <<<"$answers"
echo "$REQUESTS HTTP requests to $vip:80 answered:"
sort <<<"$answers" | uniq -c
[[ $(sort -u <<<"$answers" | wc -l) -eq 2 ]] ||
	die "all $REQUESTS requests reached one pod; sliceproxy should spread new flows over both"
kubectl -n "$NS" exec client -- /agnhost connect --protocol=udp --timeout=5s "$vip:8081" ||
	die "no UDP answer from $vip:8081"
echo "UDP $vip:8081 answered"

log "6. sliceproxy translated them"
after=$(dnat_new) || die "cannot read sliceproxy dump --json"
echo "dnat_new: $before -> $after"
((after - before >= REQUESTS + 1)) ||
	die "dnat_new grew by $((after - before)), expected at least $((REQUESTS + 1)) (one per new flow)"
dump

log "smoke test passed: Service $NS/web answers through sliceproxy"
