"""Markdown tables (one per cache layout) from a ``bench_op.py --csv`` file, for BENCHMARKS.md.

    python benchmarks/csv_to_md.py benchmarks/results/<run>.csv
"""
import csv
import sys

NAMES = {
    "qwen3-8b": "Qwen3-8B (32/8, D=128, bf16 cache)",
    "qwen3-next": "Qwen3-Next (16/2, D=256, r=64, gated, fp8 cache)",
    "glm-4.5": "GLM-4.5 (96/8, D=128, r=64, bf16 cache)",
}
HEAD = ("| shape | T | eager | compile | c+opaque | fused | +pass | floor | copy | %floor "
        "| x eager | x compile | x opaque | pass/opq |\n|---|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|---:|---:|---:|---:|")


def main(src: str) -> None:
    rows = list(csv.DictReader(open(src)))
    for layout in dict.fromkeys(r["layout"] for r in rows):
        print(f"### {layout} caches\n\n{HEAD}")
        last = None
        for r in (r for r in rows if r["layout"] == layout):
            f = {k: float(v) for k, v in r.items() if k.endswith("_us") or k == "bw_frac"}
            name = NAMES.get(r["shape"], r["shape"]) if r["shape"] != last else ""
            last = r["shape"]
            fused = f["fused_us"]
            copy = f"{f['copy_us']:.2f}" if "copy_us" in f else "-"  # older runs lack it
            print(f"| {name} | {r['T']} | {f['eager_us']:.2f} | {f['compile_us']:.2f} | "
                  f"{f['c+opaque_us']:.2f} | **{fused:.2f}** | {f['pass_us']:.2f} | "
                  f"{f['floor_us']:.2f} | {copy} | {100 * f['bw_frac']:.1f} | "
                  f"{f['eager_us'] / fused:.1f} | {f['compile_us'] / fused:.1f} | "
                  f"{f['c+opaque_us'] / fused:.2f} | {f['c+opaque_us'] / f['pass_us']:.2f} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
