#!/usr/bin/env bash
# Resident memory of `inference-pio run` on the Qwen3-small Q4_1-pure file over time (VmRSS,
# RssAnon, RssFile every 10 ms), then per mapping of a longer run after its load (smaps).
# Usage: bash sample.sh GGUF > out.txt (from the repository root, after cargo build).
set -u
GGUF=$1
PIO=./target/debug/inference-pio
$PIO run --model "$GGUF" --prompt "Hello there, how are you" --max-new-tokens 64 --ignore-eos > /dev/null 2>&1 &
for i in $(seq 1 300); do
  P=$(pgrep -f "inference-pio run" | head -1)
  [ -n "$P" ] && awk -v t=$((i * 10)) '/VmRSS|RssAnon|RssFile/{printf "%s %s kB  ", $1, $2} END{print "~" t " ms"}' /proc/$P/status 2>/dev/null
  sleep 0.01
done | uniq
wait
echo "--- per mapping, 4 s into a 3,000-token run (kB)"
$PIO run --model "$GGUF" --prompt "Hello there, how are you" --max-new-tokens 3000 --ignore-eos > /dev/null 2>&1 &
sleep 4
P=$(pgrep -f "inference-pio run" | head -1)
awk '/^[0-9a-f]+-[0-9a-f]+ /{name=($6==""?"[anon]":$6); perm=$2} /^Rss:/{r=$2} /^Private_Dirty:/{if (r > 300) print "Rss", r, "dirty", $2, perm, name}' /proc/$P/smaps
wait
