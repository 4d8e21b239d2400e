"""Modules of `make bench` (entry point: scripts/bench.py).

common   scenarios, addresses, the raw JSON the API server sends, stats
ours     sliceproxy's figures, run in one subprocess per scenario
iptables kube-proxy's iptables-mode ruleset and iptables-restore timings
nft      kube-proxy's nftables-mode ruleset and `nft -f` timings
latency  first-packet latency of new TCP connections between namespaces
connect  the client and server that latency runs inside the pods
report   the table, the Markdown for docs/benchmarks.md, the plots
"""
