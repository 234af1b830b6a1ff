"""Plot of benches/results/gpu-h100-2026-12-07n-quant-loads: kernel_check quant times (one row,
bf16 activations) per setting, and the engine's batch-1 decode. Run from the repository root."""
import glob, os, re, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

D = "benches/results/gpu-h100-2026-12-07n-quant-loads"
order = ["l1p8f0s0", "l2p8f0s0", "l4p8f0s0", "l1p4f0s0", "l1p16f0s0", "l1p8f1s0", "l4p8f1s1"]
times = {}
for f in glob.glob(D + "/call*/kernel_check_*.txt"):
    s = os.path.basename(f)[len("kernel_check_"):-4]
    for line in open(f):
        m = re.match(r"quant 4B (?:fused )?(\S+) \S+\s+(int8/channel|int4/128)\s+1 rows BF16 : rel L2 \S+ ok \| kernel\s+([\d.]+) µs", line)
        if m:
            times[(m.group(1), m.group(2), s)] = float(m.group(3))
shapes = [(sh, c) for c in ("int4/128", "int8/channel") for sh in ("q/k/v", "gate/up", "down")]
fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
w = 0.8 / len(order)
for i, s in enumerate(order):
    a.bar([j + i * w for j in range(len(shapes))], [times.get((sh, c, s), 0) for sh, c in shapes], w, label=s)
a.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], [f"{sh}\n{c}" for sh, c in shapes])
a.set_ylabel("µs per product (graph replay, incl. activation quantization)")
a.set_title("kernel_check quant, Qwen3-4B shapes, 1 row (lower is better)")
a.legend(fontsize=8, title="loads / planes / fused / SwiGLU")
dec = {}
for line in open(D + "/call19/decode.txt"):
    m = re.match(r"(\S+) (\S+) round 1: steady decode ([\d.]+)", line)
    if m:
        dec[(m.group(1), m.group(2))] = float(m.group(3))
labels = [f"{mode}\n{s[:2]}" for mode in ("int4", "int8") for s in ("l1p8f0s0", "l4p8f0s0")]
b.bar(range(4), [dec[(mode, s)] for mode in ("int4", "int8") for s in ("l1p8f0s0", "l4p8f0s0")], color=["C0", "C2", "C0", "C2"])
b.set_xticks(range(4), labels)
b.set_ylabel("tok/s")
b.set_title("Qwen3-4B batch-1 decode")
fig.suptitle("H100 80GB HBM3, 2026-12-07, binaries f3f9b46")
fig.tight_layout()
fig.savefig(sys.argv[1] if len(sys.argv) > 1 else D + ".png", dpi=90)
