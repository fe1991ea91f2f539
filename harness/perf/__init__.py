"""End-to-end performance of the perf session: engine throughput runs (speed, e2e), the compressed-tensors peer
(peer, make_peer) and the ratio report (report). The pytest side lives in harness/benchmarks/."""
