"""The running agent: its loop (agent), when to sync (schedule), its
settings, and what it serves: Prometheus metrics, /healthz, and the
healthCheckNodePort servers."""
