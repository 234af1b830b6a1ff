#!/usr/bin/env python3
"""System calls made by inference-pio worker processes, from `strace -f -o FILE` output.

The worker is the process that execs `inference-pio __worker`; its threads and children
(clone/fork return values) belong to it too. Prints one system call name per line, sorted.
Usage: worker_syscalls.py TRACE [TRACE ...]  (several traces: the union)
"""
import re
import sys

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
SPAWN = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(clone3?|fork|vfork)\b.*=\s+(\d+)")


def worker_calls(path):
    workers, calls, pending = set(), set(), set()
    with open(path, errors="replace") as trace:
        for line in trace:
            pid = int(line.split()[0]) if line[:1].isdigit() else None
            if "execve(" in line and '"__worker"' in line:
                if line.rstrip().endswith("= 0"):
                    workers.add(pid)
                else:
                    pending.add(pid)
                continue
            if pid in pending and "<... execve resumed>" in line:
                pending.discard(pid)
                if line.rstrip().endswith("= 0"):
                    workers.add(pid)
                continue
            m = SPAWN.match(line)
            if m and int(m.group(1)) in workers:
                workers.add(int(m.group(3)))
            m = LINE.match(line)
            if m and int(m.group(1)) in workers:
                calls.add(m.group(2) or m.group(3))
    return calls


def main():
    names = set()
    for path in sys.argv[1:]:
        names |= worker_calls(path)
    for name in sorted(names):
        print(name)


if __name__ == "__main__":
    main()
