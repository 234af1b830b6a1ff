#!/usr/bin/env bash
# One device call: the cgroup v2 path of the worker sandbox, on the GPU machine whose group is
# v2 with `memory` delegated. The group holds other processes, so first they are moved into a
# child `rest` and `memory` is enabled for children; then the host is started alone in a child
# `pio` (as under `systemd-run --scope -p Delegate=yes`), where it must move itself into its
# leaf and make the worker's group with memory.max. The hostile plugin at `high` with
# memory_gb = 0.25 then allocates 2 GB (the kernel's OOM killer, not the host's watchdog, must
# kill it) and 64 MB (fine). Carried: .gpu/{inference-pio,libpio_test_plugin_hostile.so}.xz.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libpio_test_plugin_hostile.so
B=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
{
  echo "base $B: controllers [$(cat $B/cgroup.controllers)], subtree_control [$(cat $B/cgroup.subtree_control)], $(wc -l < $B/cgroup.procs) processes"
  mkdir -p $B/rest
  for p in $(cat $B/cgroup.procs); do echo $p > $B/rest/cgroup.procs 2>/dev/null || echo "cannot move $p"; done
  echo +memory > $B/cgroup.subtree_control && echo "memory enabled for the children of $B"
  mkdir -p /tmp/hm && echo '{"architectures": ["PioTestHostileForCausalLM"]}' > /tmp/hm/config.json
  printf '[plugins.test-hostile]\nsecurity = "high"\nallow_degraded = true\ntimeout_s = 60\n[plugins.test-hostile.limits]\nmemory_gb = 0.25\n' > /tmp/hmem.toml
  # Each host start gets a fresh group: once a host has enabled `memory` for its children,
  # its group takes no new members (the same rule).
  alone() { local g=$B/pio-$RANDOM$RANDOM; mkdir -p $g; timeout 90 sh -c "echo \$\$ > $g/cgroup.procs && exec $PIO --config /tmp/hmem.toml $*"; echo "[exit $?]"; }
  alone $PD plugins info test-hostile | grep -E "cgroup|memory|DEGRADED"
  for p in alloc:2000 alloc:64 echo; do echo "== $p"; alone run $PD --model /tmp/hm --plugin test-hostile --raw --prompt $p 2>&1 | grep -v "^warning"; done
  echo "host leaves: $(ls -d $B/pio*/inference-pio-host 2>&1)"
} 2>&1 | tee $OUT/cgroup_v2.txt
echo "used $SECONDS s"
