"""The pure model: what the sources said (state), which endpoints this node
uses (topology), and the frontends to program (plan, planner). Nothing here
touches the kernel, cffi or libbpf: a test drives it without root."""
