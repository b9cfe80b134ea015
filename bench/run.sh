#!/usr/bin/env bash
# The full benchmark: release binaries, every scenario, every contender, 3 interleaved rounds.
# Results: bench/results/results.{json,md}; BENCHMARKS.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
cargo build --release --locked -p proxy-server -p proxy-agent -p proxy-bench
# 10,000 held connections need about 4 descriptors each across client, tunnel and upstream.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec target/release/proxy-bench --bin-dir target/release --out bench/results "$@"
