"""Summarises an ncu source-counter export (`ncu --import R --page source --csv --print-source sass`, gzipped or
not): warp-stall samples by reason over the span from a kernel's first to its last wgmma (the consumers' main loop
in the Hopper kernels) and outside it, and the span's instructions with the most samples.

    python3 scripts/ncu_src_summary.py ncu_bwd128_src.csv.gz [--top 25]

(perf.md v28: the d128 WS backward's consumers spent 17% of their samples at the dQ product's first HGMMA, behind
the dS^T barrier.)
"""

import argparse
import collections
import csv
import gzip
import sys


def number(text):
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt") as f:
        rows = list(csv.reader(f))
    # The export starts with a "Kernel Name" line, then the header row.
    start = next((i for i, r in enumerate(rows) if "Source" in r and "Address" in r), None)
    if start is None:
        sys.exit(f"{args.csv}: no source table (did the profiled run fail? see its ncu log)")
    header, body = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    if start > 0:
        print(" ".join(rows[0])[:200])
    src = header.index("Source")
    samples = header.index("Warp Stall Sampling (All Samples)")
    reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    mma = [i for i, r in enumerate(body) if "HGMMA" in r[src]]
    if not mma:
        sys.exit("no HGMMA in the export")
    lo, hi = mma[0], mma[-1]
    total = sum(number(r[samples]) for r in body)
    print(f"{len(body)} instructions, {total:.0f} samples; wgmma span: instructions {lo}-{hi}")
    for name, part in (("before the span", body[:lo]), ("the span", body[lo:hi + 1]), ("after the span", body[hi + 1:])):
        by = collections.Counter()
        for r in part:
            for i in reasons:
                by[header[i][6:]] += number(r[i])
        n = sum(by.values())
        share = ", ".join(f"{k} {v / n:.1%}" for k, v in by.most_common(7)) if n else "-"
        print(f"{name}: {n:.0f} samples ({n / max(total, 1):.1%}): {share}")
    span_total = sum(number(r[samples]) for r in body[lo:hi + 1])
    print(f"top {args.top} instructions of the span (samples, share of the span, first two reasons):")
    for i in sorted(sorted(range(lo, hi + 1), key=lambda i: -number(body[i][samples]))[:args.top]):
        r = body[i]
        top2 = sorted(((number(r[j]), header[j][6:]) for j in reasons), reverse=True)[:2]
        print(f"  {i:5d} {number(r[samples]):8.0f} {number(r[samples]) / max(span_total, 1):6.1%}  "
              f"{r[src].strip()[:58]:58s} {', '.join(f'{k} {v:.0f}' for v, k in top2)}")


if __name__ == "__main__":
    main()
