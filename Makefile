# Every entry point a person types. `make test` and `make demo` set
# themselves up: Debian packages, the Python environment, the BPF object.

PYTHON ?= python3
CLANG ?= clang
VENV := .venv
BIN := $(VENV)/bin
ARCH_INC := /usr/include/$(shell uname -m)-linux-gnu
# -mcpu=v3: BPF atomics (compare-and-swap, fetch-or), which hand SNAT ports
# over between CPUs (kernel 5.12 or later), and 32-bit subregisters.
BPF_CFLAGS := -O2 -g -target bpf -mcpu=v3 -I$(ARCH_INC) -Iebpf -Wall -Werror
BPF_OBJS := build/sliceproxy_tc.bpf.o
# The control plane's C helper (ctrl/dataplane/native.c: Maglev tables;
# ctrl/dataplane/endpoints.c: a slice's endpoints read from their JSON),
# loaded through cffi like libbpf.
NATIVE_LIB := build/libsliceproxy.so
NATIVE_CFLAGS := -O2 -g -shared -fPIC -Wall -Werror

.PHONY: all deps bpf native venv k8s k8s-node image images-node test unit datapath netns cluster node e2e fuzz demo bench \
	bench-quick bench-subsets bench-npl bench-maglev bpffs lint clean \
	vagrant-up vagrant-test vagrant-redeploy vagrant-destroy

all: bpf native venv

deps:
	@bash scripts/install-deps.sh

bpf: $(BPF_OBJS)

native: $(NATIVE_LIB)

$(NATIVE_LIB): ctrl/dataplane/native.c ctrl/dataplane/endpoints.c | deps
	@mkdir -p build
	$(CLANG) $(NATIVE_CFLAGS) $^ -o $@

# The tc object is one translation unit (ebpf/sliceproxy_tc.bpf.c includes
# one file per attach point, which include ebpf/lib/): rebuilt when any of
# them changes. Compiled once, with BTF (-g), so bpftool prints field names
# and the agent checks layouts at start.
BPF_SRCS := $(wildcard ebpf/*.h ebpf/*.c ebpf/lib/*.h)

build/%.bpf.o: ebpf/%.bpf.c $(BPF_SRCS) | deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# bcc's Python module (python3-bpfcc, for `sliceproxy trace`) is Debian's, in
# the system Python's dist-packages: it alone is linked into the virtualenv
# (a symlink in its site-packages), so no other system package joins ours or
# shadows a pinned one. Without python3-bpfcc, `trace` says what to install.
BCC_PY := /usr/lib/python3/dist-packages/bcc
venv: $(VENV)/.installed
	@if [ -d $(BCC_PY) ]; then \
		ln -sfn $(BCC_PY) "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"; \
	fi

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# The real Kubernetes control plane for the cluster tests: kube-apiserver and
# kube-controller-manager built from the Kubernetes Go module at the version
# in scripts/k8s-version, cached outside the repository (a no-op when built).
k8s:
	bash scripts/build-k8s.sh

# The node tier and the e2e run also need kube-scheduler, kubelet,
# kube-proxy, kubectl, e2e.test and agnhost from the same module.
k8s-node:
	bash scripts/build-k8s.sh node

# The container image (deploy/Containerfile) built with podman on base images
# made by debootstrap, cached outside the repository by what it is built from
# (scripts/build-images.sh); `images-node` adds the pause and agnhost images.
image: deps
	bash scripts/build-images.sh

images-node: deps k8s-node
	bash scripts/build-images.sh node

# Pins need a bpf filesystem; most distributions mount one, containers may not.
bpffs:
	@grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf

test: all bpffs k8s k8s-node images-node lint
	$(BIN)/python -m pytest -q tests

# ruff (lint and format) and mypy on the control plane, and its import
# layering (the table in docs/architecture.md).
lint: venv
	$(BIN)/ruff check ctrl tests/unit tests/datapath tests/netns tests/cluster tests/node tests/bench tests/fuzz \
		tests/bpfbuild.py scripts/bench.py scripts/bench scripts/harness scripts/check_layers.py
	$(BIN)/ruff format --check ctrl
	$(BIN)/mypy ctrl
	$(BIN)/python scripts/check_layers.py

unit: venv native
	$(BIN)/python -m pytest -q tests/unit

datapath: all
	$(BIN)/python -m pytest -q tests/datapath

netns: all bpffs
	$(BIN)/python -m pytest -q tests/netns

# The fuzz tier at length: 1,000,000 packets through every program and
# 20,000 malformed objects through both sources (`make test` runs 50,000
# and 300). SLICEPROXY_FUZZ_SEED=N replays the run that printed N.
FUZZ_PACKETS ?= 1000000
FUZZ_OBJECTS ?= 20000
fuzz: all
	SLICEPROXY_FUZZ_PACKETS=$(FUZZ_PACKETS) SLICEPROXY_FUZZ_OBJECTS=$(FUZZ_OBJECTS) \
		$(BIN)/python -m pytest -q -s tests/fuzz

# k8s-node: the bench smoke test runs kube-proxy.
cluster: all bpffs k8s k8s-node
	$(BIN)/python -m pytest -q tests/cluster

# A real node: kubelet, containerd and CNI in a network namespace running the
# DaemonSet from the image, and a few of Kubernetes' own Service tests.
node: all bpffs k8s-node images-node
	$(BIN)/python -m pytest -q tests/node

# Kubernetes' own [sig-network] Service tests (tests/node/e2e-list.txt) on
# two test nodes, once with sliceproxy and once with kube-proxy built from the
# same module; reports in build/e2e-*, table in docs/conformance.md.
E2E_LIST ?= tests/node/e2e-list.txt
E2E_NODES ?= 2
e2e: all bpffs k8s-node images-node
	$(BIN)/python -m tests.node.e2e_run --proxy sliceproxy --nodes $(E2E_NODES) --list $(E2E_LIST) --report build/e2e-sliceproxy; \
	  sp=$$?; \
	  $(BIN)/python -m tests.node.e2e_run --proxy kube-proxy --nodes $(E2E_NODES) --list $(E2E_LIST) --report build/e2e-kube-proxy; \
	  exit $$sp

demo: all bpffs
	$(BIN)/python scripts/demo.py

bench: all bpffs
	mkdir -p build
	$(BIN)/python scripts/bench.py --json build/bench.json --markdown build/bench-table.md --plots docs/bench
	$(MAKE) bench-subsets
	$(MAKE) bench-npl
	$(MAKE) bench-maglev

# EndpointSlice subsetting's watch traffic per agent, subsetted and not
# (docs/subsetting.md): needs a real API server, from `make k8s`.
bench-subsets: all k8s
	mkdir -p build
	$(BIN)/python scripts/bench/subsets.py --json build/bench-subsets.json

# Network programming latency on a real API server (docs/benchmarks.md):
# sliceproxy and kube-proxy's iptables and nftables modes follow the same
# rolling update of S1 and S2; table, JSON and plot. Needs `make k8s-node`
# (kube-proxy).
bench-npl: all bpffs k8s-node
	mkdir -p build
	$(BIN)/python scripts/bench/npl.py --json build/bench-npl.json --plot build/npl.png

# Maglev tables (--external-lb=maglev, docs/benchmarks.md): build time,
# disruption, kernel memory per table, one-slice change with and without.
bench-maglev: all
	mkdir -p build
	$(BIN)/python scripts/bench/maglev.py --json build/bench-maglev.json

bench-quick: all bpffs
	$(BIN)/python scripts/bench.py --quick

# The local VM (vagrant/, docs/local-vm.md): single-node k3s without
# kube-proxy, sliceproxy built and deployed inside it. Needs Vagrant and
# VirtualBox or libvirt on the host; `make test` only validates it.
vagrant-up:
	cd vagrant && vagrant up

vagrant-test:
	cd vagrant && vagrant ssh -c 'sudo bash /home/vagrant/sliceproxy/vagrant/smoke-test.sh'

vagrant-redeploy:
	cd vagrant && vagrant rsync && vagrant provision --provision-with sliceproxy

vagrant-destroy:
	cd vagrant && vagrant destroy -f

clean:
	rm -rf build $(VENV) *.egg-info
