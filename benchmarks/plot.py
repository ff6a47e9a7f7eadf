"""Plot fraction of the floor vs T for each implementation, one panel per shape and layout.

    python benchmarks/plot.py benchmarks/results/<run>.csv benchmarks/results/<run>.png
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = [("eager_us", "eager PyTorch"), ("compile_us", "torch.compile (view write)"),
         ("c+opaque_us", "torch.compile (opaque cache op)"), ("fused_us", "fused op"),
         ("pass_us", "torch.compile + fusion_pass")]


def main(src: str, dst: str) -> None:
    rows = list(csv.DictReader(open(src)))
    by_shape = defaultdict(list)
    for r in rows:
        by_shape[(r["shape"], r["layout"])].append(r)
    shapes = sorted({s for s, _ in by_shape})
    layouts = sorted({lay for _, lay in by_shape}, reverse=True)  # NHD first
    fig, axes = plt.subplots(len(layouts), len(shapes), figsize=(5 * len(shapes),
                                                                 4 * len(layouts)), squeeze=False)
    for (shape, layout), rs in sorted(by_shape.items()):
        ax = axes[layouts.index(layout)][shapes.index(shape)]
        rs.sort(key=lambda r: int(r["T"]))
        ts = [int(r["T"]) for r in rs]
        for key, label in IMPLS:
            ys = [float(r["floor_us"]) / float(r[key]) for r in rs]
            ax.plot(ts, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("floor / measured time (1 = floor)")
        ax.set_title(f"{shape} {layout}")
        ax.axhline(0.85, color="gray", ls="--", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
