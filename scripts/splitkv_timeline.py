"""Where the decode step's time goes, block by block: run against a debug build of the library configured with
-DFLASH_ATTN2_SPLITKV_TIMELINE in CMAKE_CXX_FLAGS and CMAKE_CUDA_FLAGS (hopper_check.sh's `timeline` step builds
one), whose split-KV and combine blocks stamp %globaltimer and clock64 at fixed points (tile_primitives.cuh,
FA2_TIMELINE) into a buffer the launcher appends to $FLASH_ATTN2_TIMELINE_FILE after each call (synchronising).

Each call runs alone (the previous one was waited for), so there is no programmatic-dependent overlap with a
previous kernel here. Times in µs from the first split-KV block's entry; per-block phases from clock64 at the
SM clock estimated from the blocks' own clock64 / %globaltimer ratio. Medians over the calls of each figure.

    FLASH_ATTN2_LIBRARY=build/timeline/libflash_attn2.so PYTHONPATH=python python3 scripts/splitkv_timeline.py

With FLASH_ATTN2_TIMELINE_TWICE=1 the launcher runs each step twice and the second's stamps are kept: its code is
warm in the instruction caches, so phases that shrink there (the epilogue, the combine) are code fetched cold.
"""

import argparse
import os
import statistics
import tempfile

import torch

import flash_attn2

SLOTS = 12  # kTimelineSlots: ns entry, clk entry, clk after wait, clk first tile, clk after loop, clk end, ns end,
#            smid, then clocks inside the epilogue / the combine (8, 9, 10; tile_primitives.cuh)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def parse(line):
    """One call's line: (split-KV blocks that ran, combine blocks, split count), each block its SLOTS stamps."""
    vals = [int(x) for x in line.split()]
    nsplit, ncomb, splits = vals[:3]
    stamps = vals[3:]
    # (rows of blocks that did not run stay zero: a persistent grid has fewer blocks than work items)
    blocks = [b for b in (stamps[i * SLOTS:(i + 1) * SLOTS] for i in range(nsplit)) if b[1] != 0]
    comb = [stamps[(nsplit + i) * SLOTS:(nsplit + i + 1) * SLOTS] for i in range(ncomb)]
    return blocks, comb, splits


def sm_loops(line):
    """Per SM, the mean loop time (clocks) of the split blocks on it, for the consistency check across calls."""
    per = {}
    for b in parse(line)[0]:
        if b[3] > 0:
            per.setdefault(b[7], []).append(b[4] - b[3])
    return {sm: statistics.fmean(x) for sm, x in per.items()}


def analyse(line):
    blocks, comb, splits = parse(line)
    t0 = min(b[0] for b in blocks)
    ratios = [(b[5] - b[1]) / (b[6] - b[0]) for b in blocks if b[6] - b[0] >= 2000]
    ghz = statistics.median(ratios) if ratios else 1.98
    us = lambda clk: clk / ghz / 1000.0  # noqa: E731
    with_tiles = [b for b in blocks if b[3] > 0]
    per_sm = {}
    for b in blocks:
        per_sm[b[7]] = per_sm.get(b[7], 0) + 1
    r = {
        "splits": splits, "blocks": len(blocks), "ghz": ghz,
        "start p50": pct([(b[0] - t0) / 1000 for b in blocks], 0.5),
        "start max": max((b[0] - t0) / 1000 for b in blocks),
        "wait p50": pct([us(b[2] - b[1]) for b in blocks], 0.5),
        "1st tile p50": pct([us(b[3] - b[2]) for b in with_tiles], 0.5),
        "1st tile max": max((us(b[3] - b[2]) for b in with_tiles), default=float("nan")),
        "loop p50": pct([us(b[4] - b[3]) for b in with_tiles], 0.5),
        "loop max": max((us(b[4] - b[3]) for b in with_tiles), default=float("nan")),
        "epilogue p50": pct([us(b[5] - b[4]) for b in blocks], 0.5),
        "block p50": pct([us(b[5] - b[1]) for b in blocks], 0.5),
        # The 16-row epilogue's phases (0 where the 64-row kernel ran): stats and barrier, scaled rows into shared
        # memory and barrier, the merge and its stores, the LSE stores.
        "epi stats p50": pct([us(b[8] - b[4]) for b in blocks if b[10]], 0.5),
        "epi rows p50": pct([us(b[9] - b[8]) for b in blocks if b[10]], 0.5),
        "epi merge p50": pct([us(b[10] - b[9]) for b in blocks if b[10]], 0.5),
        "epi lse p50": pct([us(b[5] - b[10]) for b in blocks if b[10]], 0.5),
        "split end p50": pct([(b[6] - t0) / 1000 for b in blocks], 0.5),
        "split end": max((b[6] - t0) / 1000 for b in blocks),
        # What balancing the blocks could give at most: the mean split end (where every block would end if the
        # stream's bytes were shared evenly) against the last one.
        "split end mean": statistics.fmean((b[6] - t0) / 1000 for b in blocks),
        # Loop time of blocks alone on their SM against those sharing it (the median of each; nan if none).
        "loop alone p50": pct([us(b[4] - b[3]) for b in with_tiles if per_sm[b[7]] == 1], 0.5),
        "loop shared p50": pct([us(b[4] - b[3]) for b in with_tiles if per_sm[b[7]] > 1], 0.5),
        "blocks/SM max": max(per_sm.values()), "SMs": len(per_sm),
    }
    if comb:
        r["combine start"] = min((c[0] - t0) / 1000 for c in comb)
        r["combine wait p50"] = pct([us(c[2] - c[1]) for c in comb], 0.5)
        r["combine work p50"] = pct([us(c[5] - c[2]) for c in comb], 0.5)
        r["comb weights p50"] = pct([us(c[8] - c[2]) for c in comb], 0.5)  # loads issued, LSEs landed, weights (every warp its own)
        r["comb lse p50"] = pct([us(c[10] - c[2]) for c in comb], 0.5)  # LSE and partial loads issued, LSEs landed, their max
        r["comb reduce p50"] = pct([us(c[8] - c[10]) for c in comb], 0.5)  # weights (exps) and their sum across the warp
        r["comb sums p50"] = pct([us(c[9] - c[8]) for c in comb], 0.5)  # weighted partials, barrier
        r["comb store p50"] = pct([us(c[5] - c[9]) for c in comb], 0.5)  # groups summed, O stored
        r["combine end"] = max((c[6] - t0) / 1000 for c in comb)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1,8,1024;1,8,8192;1,8,32768;1,32,8192;16,8,8192")
    ap.add_argument("--calls", type=int, default=7)
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(";"):
        b, hkv, n = (int(x) for x in case.split(","))
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(5):
            flash_attn2.attention_kvcache(q, k, v)
        torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
            os.environ["FLASH_ATTN2_TIMELINE_FILE"] = f.name
            for _ in range(args.calls):
                flash_attn2.attention_kvcache(q, k, v)
            del os.environ["FLASH_ATTN2_TIMELINE_FILE"]
            lines = [line for line in f.read().splitlines() if line.strip()]
            calls = [analyse(line) for line in lines]
        # Is a slow SM slow in every call? The correlation of the per-SM mean loop time between the first half of
        # the calls and the second (near 1: the spread is where a block runs; near 0: it is noise).
        if len(lines) >= 4:
            halves = [lines[: len(lines) // 2], lines[len(lines) // 2:]]
            means = []
            for half in halves:
                acc = {}
                for line in half:
                    for sm, x in sm_loops(line).items():
                        acc.setdefault(sm, []).append(x)
                means.append({sm: statistics.fmean(x) for sm, x in acc.items()})
            common = sorted(set(means[0]) & set(means[1]))
            if len(common) >= 3:
                a, c = [means[0][sm] for sm in common], [means[1][sm] for sm in common]
                varied = statistics.pstdev(a) > 0 and statistics.pstdev(c) > 0
                corr = statistics.correlation(a, c) if varied else float("nan")
                for cl in calls:
                    cl["SM loop corr"] = corr
                slowest = sorted(common, key=lambda sm: -(means[0][sm] + means[1][sm]))[:8]
                ratios = [round((means[0][sm] + means[1][sm]) / 2 / statistics.median(a), 3) for sm in slowest]
                print(f"{case}: per-SM loop corr {corr:.2f}; slowest SMs {slowest}; their loop / median {ratios}")
        assert calls, "no timeline written: is this a -DFLASH_ATTN2_SPLITKV_TIMELINE build?"
        med = {key: statistics.median(c[key] for c in calls) for key in calls[0]}
        rows.append((case, med))
    keys = list(rows[0][1])
    for _, med in rows[1:]:
        keys += [k for k in med if k not in keys]
    print("| B,Hkv,L | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for case, med in rows:
        cells = [f"{med[k]:.2f}" if isinstance(med.get(k), float) else str(med.get(k, "")) for k in keys]
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
