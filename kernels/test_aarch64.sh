#!/usr/bin/env bash
# The kernels crate's unit tests for aarch64 (its NEON loop, `quant::simd::neon`, and the
# portable loops that other aarch64 paths take), cross-built here and run under qemu-user.
# Not part of CI (a cold cross build takes about 25 minutes on 2 cores); run it after
# changing the CPU loops. Needs the Rust target and, on Debian/Ubuntu:
#   apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   rustup target add aarch64-unknown-linux-gnu
# Usage: bash kernels/test_aarch64.sh [test-name filter]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/aarch64-cross}
exec cargo test -p inference-pio-kernels --target aarch64-unknown-linux-gnu --locked --lib "$@"
