"""The network-namespace harness: a throwaway node and its pods in network
namespaces (topo), the servers and the client run inside them (servers,
client). The tests (tests/netns, tests/cluster) and the scripts (the demo,
the bench) import it from here (docs/architecture.md, "Where the harness
lives")."""
