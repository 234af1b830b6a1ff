#!/usr/bin/env bash
# strace as carried to the GPU machine (which has none): .gpu/strace/ holds strace 6.1 and its
# libraries from the build machine, run through their own loader so that the traced program
# keeps the system's. Arguments as strace's. Run from the repository root.
exec .gpu/strace/ld-linux-x86-64.so.2 --library-path .gpu/strace .gpu/strace/strace "$@"
