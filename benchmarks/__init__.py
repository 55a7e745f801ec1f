"""cadbcnn_bench — latency/throughput/accuracy benchmarks (installed from the top-level `benchmarks/` folder)."""
