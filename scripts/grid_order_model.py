"""A list-scheduling model of the attention grids' tails: blocks are dispatched in index order to whichever of
the SMs frees first (one block per SM, as the Hopper kernels run), each costing its tile's steps. Prints the
model's time over the perfect balance (total work / SMs) for the orders of GridOrder (csrc/attention_rule.h):
head by head, tile rank by tile rank over all heads, and heads in groups of G (the WS backward's default on
short masked rows: groups of 8; measured in perf.md v26).

    python3 scripts/grid_order_model.py [--sms 132]
"""

import argparse
import heapq
import math


def makespan(costs, sms):
    free = [0.0] * sms
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def order(costs_by_rank, heads, group):
    """Block costs in grid order: group 0 / 1 head by head, else groups of `group` heads, rank by rank inside."""
    tiles = len(costs_by_rank)
    if group <= 1:
        return [costs_by_rank[r] for _ in range(heads) for r in range(tiles)]
    out = []
    for base in range(0, heads, group):
        for r in range(tiles):
            out += [costs_by_rank[r]] * min(group, heads - base)
    return out


def bwd_costs(n, block_n, block_m, per_block_heads, causal):
    """Backward, rank r = key tile r: the query steps it visits (causal: from its first key on) x q heads."""
    return [per_block_heads * math.ceil((n - (r * block_n if causal else 0)) / block_m)
            for r in range(math.ceil(n / block_n))]


def fwd_costs(n, block_m, block_n, causal):
    """Forward, rank r = query tile num_m - 1 - r (the longest first): the key tiles it visits."""
    num_m = math.ceil(n / block_m)
    return [math.ceil(((num_m - r) * block_m if causal else n) / block_n) for r in range(num_m)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args()
    groups = (1, 0, 4, 8, 16)  # 0: rank by rank over every head (one group of all)
    print("| case | blocks | " + " | ".join("head by head" if g == 1 else "rank by rank" if g == 0 else f"groups of {g}"
                                        for g in groups) + " |")
    print("|---" * (len(groups) + 2) + "|")
    cases = [  # (name, costs by rank, heads in the grid)
        ("bwd d128 causal 2k, B 8, H 16", bwd_costs(2048, 128, 80, 1, True), 8 * 16),
        ("bwd d128 causal 8k, B 2, H 16", bwd_costs(8192, 128, 80, 1, True), 2 * 16),
        ("bwd d128 causal 16k, B 1, H 16", bwd_costs(16384, 128, 80, 1, True), 16),
        ("bwd d64 causal 8k, B 2, H 32", bwd_costs(8192, 128, 128, 1, True), 2 * 32),
        ("bwd GQA 64/8 causal 4k, B 4", bwd_costs(4096, 128, 80, 8, True), 4 * 8),
        ("bwd GQA 64/8 causal 8k, B 2", bwd_costs(8192, 128, 80, 8, True), 2 * 8),
        ("bwd GQA 32/8 causal 4k, B 4", bwd_costs(4096, 128, 80, 4, True), 4 * 8),
        ("fwd d128 causal 2k, B 8, H 16", fwd_costs(2048, 128, 128, True), 8 * 16),
        ("fwd d128 causal 8k, B 2, H 16", fwd_costs(8192, 128, 128, True), 2 * 16),
        ("fwd d64 causal 2k, B 8, H 32", fwd_costs(2048, 192, 128, True), 8 * 32),
        ("fwd GQA 64 q heads causal 4k, B 4", fwd_costs(4096, 128, 128, True), 4 * 64),
    ]
    for name, costs, heads in cases:
        ideal = sum(costs) * heads / args.sms
        cells = [makespan(order(costs, heads, heads if g == 0 else g), args.sms) / ideal for g in groups]
        print(f"| {name} | {len(costs) * heads} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
