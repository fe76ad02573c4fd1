"""Small shapes for compute-sanitizer (memcheck, racecheck): every kernel path once, tails and masks included,
with every variant (window, softcap, ALiBi, dropout, varlen, deterministic), and the split-KV / KV-cache path
(dense and paged caches, append, splits, the combine)."""

import os

import torch

import flash_attn2

# FA2_SANITIZE=kvcache runs only the split-KV / KV-cache cases; FA2_SANITIZE=fwd only forwards of several key
# tiles (the double-buffered Hopper forward's pipeline: d128 with both loops and d256, plain and with score
# modifiers); FA2_SANITIZE=attention only the dense and varlen forward / backward cases (no KV cache);
# FA2_SANITIZE=ws the warp-specialised forward (FLASH_ATTN2_FWD_WS=require), d = 64, 128, 256, dense and varlen,
# d64 / d128's O by the TMA across many tiles a block (the bfloat16 d128 softcap kernel's too), the d256 kernel's
# 80-key tiles, packed batches' tiles longest sequence first (SeqOrder), and clusters of two sharing K / V tiles.
only_kvcache = os.environ.get("FA2_SANITIZE") == "kvcache"
skip_kvcache = os.environ.get("FA2_SANITIZE") == "attention"

torch.manual_seed(0)
rng = torch.tensor([7, 8])
if os.environ.get("FA2_SANITIZE") == "ws":  # the warp-specialised forward (TMA, mbarriers, ping-pong), every d
    os.environ["FLASH_ATTN2_FWD_WS"] = "require"
    for dtype in (torch.bfloat16, torch.float16):
        for d, nq, nk, causal in [(128, 200, 300, True), (128, 40, 520, False), (128, 130, 130, True),
                                  (64, 200, 300, True), (64, 450, 200, False), (256, 130, 200, True)]:
            q = torch.randn(2, 2, nq, d, device="cuda", dtype=dtype)
            k = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype)
            v = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype)
            flash_attn2.attention(q, k, v, causal)
            flash_attn2.attention(q, k, v, causal, window_size=(150, 7), softcap=4.0, dropout_p=0.2, rng_state=rng)
        for d in (64, 128, 256):  # packed, with an empty sequence
            cu = torch.tensor([0, 70, 70, 300], device="cuda", dtype=torch.int32)
            q, k, v = (torch.randn(300, 2, d, device="cuda", dtype=dtype) for _ in range(3))
            flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, True)
            os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"] = "3"  # the persistent walk: many tiles per block
            flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, True)
            os.environ["FLASH_ATTN2_FWD_WS_WALK"] = "dynamic"  # ... taken from the per-call tile counter
            flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, True)
            lens = [0, 5, 130, 0, 64, 300, 17, 128, 0]  # SeqOrder's table: longest first, empty ones last
            cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
            q, k, v = (torch.randn(sum(lens), 2, d, device="cuda", dtype=dtype) for _ in range(3))
            flash_attn2.attention_varlen(q, k, v, cu, cu, 300, 300, False)
            flash_attn2.attention_varlen(q, k, v, cu, cu, 300, 300, True, softcap=4.0)
            del os.environ["FLASH_ATTN2_FWD_WS_WALK"]
            q, k, v = (torch.randn(2, 4, 400, d, device="cuda", dtype=dtype) for _ in range(3))
            flash_attn2.attention(q, k, v, True, window_size=(100, 0), softcap=4.0)
            del os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"]
        os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"] = "3"  # d64 / d128 dense rows, many tiles a block: O by the TMA
        for d in (128, 120, 64):
            q, k, v = (torch.randn(2, 3, n, d, device="cuda", dtype=dtype) for n in (300, 260, 260))
            flash_attn2.attention(q, k, v, False)
            flash_attn2.attention(q, k, v, False, dropout_p=0.2, rng_state=rng)
            flash_attn2.attention(q, k, v, True, softcap=30.0)  # bfloat16 d128 / d120: the softcap kernel
        flash_attn2.attention(q, k, v, True, softcap=4.0)
        os.environ["FLASH_ATTN2_FWD_WS_BLOCKN"] = "80"  # d256's 80-key tiles, persistent and one block per tile
        q, k, v = (torch.randn(2, 2, n, 256, device="cuda", dtype=dtype) for n in (200, 330, 330))
        flash_attn2.attention(q, k, v, False)
        del os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"]
        flash_attn2.attention(q, k, v, True)
        del os.environ["FLASH_ATTN2_FWD_WS_BLOCKN"]
        # Clusters of two sharing K / V tiles (multicast copies, both blocks' releases): d128 / d120 / d256 / d240,
        # uniform rows of an even number of query tiles, partial key tiles, GQA; pairs per two tiles and 2 / 4
        # blocks walking many tiles.
        os.environ["FLASH_ATTN2_FWD_CLUSTER"] = "require"
        for d in (128, 120, 256, 240):
            q = torch.randn(2, 4, 256, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(2, 2, 333, d, device="cuda", dtype=dtype) for _ in range(2))
            for blocks in ("", "2", "5"):
                os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"] = blocks
                flash_attn2.attention(q, k, v, False)
        del os.environ["FLASH_ATTN2_FWD_CLUSTER"], os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"]
        # The stream-K tail (tiles split by key tiles, each finished by its second piece from the first's partial):
        # blocks alone (an odd number of query tiles a head) and clusters of two, 4 / 3 / 7 walkers.
        os.environ["FLASH_ATTN2_FWD_STREAMK"] = "require"
        for d, nq, blocks in ((128, 640, "4"), (120, 512, "6"), (128, 1024, "14")):
            q = torch.randn(2, 5, nq, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(2, 5, 1000, d, device="cuda", dtype=dtype) for _ in range(2))
            os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"] = blocks
            flash_attn2.attention(q, k, v, False)
        del os.environ["FLASH_ATTN2_FWD_STREAMK"], os.environ["FLASH_ATTN2_FWD_WS_BLOCKS"]
    torch.cuda.synchronize()
    print("sanitize cases ran (ws)")
    raise SystemExit(0)


def backward_cases(dtype, d, shapes, deterministic_varlen):
    """Backward cases for one (dtype, d): each (nq, nk, causal) of `shapes` plain, with a window, softcap and
    dropout, with a window and softcap alone, and deterministic plain and with a softcap (GQA 2:1); a
    deterministic unmasked 300 x 300 (the rotated walk); then a packed causal batch with an empty sequence, plain
    and with a softcap (and, with deterministic_varlen, its deterministic backward)."""
    for nq, nk, causal in shapes:
        q = torch.randn(2, 2, nq, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        flash_attn2.attention(q, k, v, causal).sum().backward()
        flash_attn2.attention(q, k, v, causal, window_size=(150, 7), softcap=4.0, dropout_p=0.2,
                              rng_state=rng).sum().backward()
        # A softcap alone (bfloat16 d128: the WS backward's softcap kernel), default and deterministic.
        flash_attn2.attention(q, k, v, causal, window_size=(150, 7), softcap=4.0).sum().backward()
        for softcap in (0.0, 4.0):
            out, lse = flash_attn2.attention_with_lse(q.detach(), k.detach(), v.detach(), causal, softcap=softcap)
            torch.ops.flash_attn2.bwd(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, causal,
                                      None, softcap=softcap, deterministic=True)
    # The rotated deterministic walk (unmasked, several query and key tiles per head: RotatedDqWalk).
    q, k, v = (torch.randn(1, 2, 300, d, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = flash_attn2.attention_with_lse(q, k, v, False)
    torch.ops.flash_attn2.bwd(torch.randn_like(out), q, k, v, out, lse, False, None, deterministic=True)
    cu = torch.tensor([0, 70, 70, 300], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(300, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, True).sum().backward()
    flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, True, softcap=4.0).sum().backward()
    if deterministic_varlen:
        out, lse = flash_attn2.attention_varlen_with_lse(q.detach(), k.detach(), v.detach(), cu, cu, 230, 230, True)
        torch.ops.flash_attn2.bwd_varlen(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, cu,
                                         230, 230, True, None, deterministic=True)


if os.environ.get("FA2_SANITIZE") == "wsbwd":  # the warp-specialised backward (the sm_90 default at d128 and d64;
    # its larger steps by default: 80 queries at d128 unmasked, 128 at d64; then 64 queries a step forced)
    os.environ["FLASH_ATTN2_BWD_WS"] = "require"
    for dtype, d in [(torch.bfloat16, 128), (torch.float16, 128), (torch.bfloat16, 64)]:
        backward_cases(dtype, d, [(200, 300, True), (40, 520, False), (300, 130, True)], deterministic_varlen=True)
    os.environ["FLASH_ATTN2_BWD_WS_BLOCKM"] = "64"  # 64 queries a step where the larger steps would run
    for dtype, d, causal in [(torch.bfloat16, 128, False), (torch.float16, 128, False), (torch.bfloat16, 64, True),
                             (torch.float16, 64, False)]:
        q = torch.randn(2, 4, 333, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, 2, 517, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        flash_attn2.attention(q, k, v, causal).sum().backward()
        cu = torch.tensor([0, 70, 70, 300], device="cuda", dtype=torch.int32)
        q, k, v = (torch.randn(300, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        flash_attn2.attention_varlen(q, k, v, cu, cu, 230, 230, causal).sum().backward()
    del os.environ["FLASH_ATTN2_BWD_WS_BLOCKM"]
    os.environ["FLASH_ATTN2_BWD_WS_MOD_BIG"] = "0"  # 64 queries a step with score modifiers (the larger steps:
    # backward_cases above and the default)
    for d in (64, 128):
        for causal, opts in ((True, dict(softcap=30.0)), (False, dict(window_size=(90, 17), dropout_p=0.2,
                             rng_state=torch.tensor([5, 6]), alibi_slopes=torch.rand(4, device="cuda")))):
            q = torch.randn(2, 4, 333, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(2, 2, 517, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            flash_attn2.attention(q, k, v, causal, **opts).sum().backward()
    del os.environ["FLASH_ATTN2_BWD_WS_MOD_BIG"]
    # Clusters of two sharing each step's Q and dO (multicast copies, the producers' releases to each other): d128
    # and below, both step sizes, an even number of key tiles, GQA, steps past the sequence's end.
    os.environ["FLASH_ATTN2_BWD_CLUSTER"] = "require"
    for blockm in ("", "64"):
        os.environ["FLASH_ATTN2_BWD_WS_BLOCKM"] = blockm
        for dtype, d in [(torch.bfloat16, 128), (torch.float16, 112)]:
            q = torch.randn(2, 4, 333, d, device="cuda", dtype=dtype, requires_grad=True)
            k, v = (torch.randn(2, 2, 500, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            flash_attn2.attention(q, k, v, False).sum().backward()
    del os.environ["FLASH_ATTN2_BWD_CLUSTER"], os.environ["FLASH_ATTN2_BWD_WS_BLOCKM"]
    torch.cuda.synchronize()
    print("sanitize cases ran (wsbwd)")
    raise SystemExit(0)
if os.environ.get("FA2_SANITIZE") == "widebwd":  # the d256 backwards: dQ warpgroup; split roles, TMA and red.add dQ
    for wide, dq, loads in (("", "", ""), ("", "red", ""), ("2wg", "", ""), ("2wg", "red", ""), ("", "", "0"),
                            ("", "red", "0")):
        os.environ["FLASH_ATTN2_BWD_WIDE"] = wide
        os.environ["FLASH_ATTN2_BWD_WS_DQ"] = dq
        os.environ["FLASH_ATTN2_BWD_WIDE_TMA_LOADS"] = loads  # "0": Q and dO by cp.async, not the TMA
        for dtype, d in [(torch.bfloat16, 256), (torch.float16, 240)]:
            backward_cases(dtype, d, [(200, 130, True), (40, 260, False), (300, 70, True)], deterministic_varlen=True)
    torch.cuda.synchronize()
    print("sanitize cases ran (widebwd)")
    raise SystemExit(0)
if os.environ.get("FA2_SANITIZE") == "fwd":
    for dtype, overlap in [(dt, o) for dt in (torch.bfloat16, torch.float16) for o in ("0", "1")]:
        os.environ["FLASH_ATTN2_FWD_OVERLAP"] = overlap  # both d128 loops (read at every launch)
        for d, nq, nk, causal in [(128, 200, 300, True), (128, 40, 520, False), (256, 70, 200, False),
                                  (64, 130, 300, True)]:
            q = torch.randn(2, 2, nq, d, device="cuda", dtype=dtype)
            k = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype)
            v = torch.randn(2, 1, nk, d, device="cuda", dtype=dtype)
            flash_attn2.attention(q, k, v, causal)
            flash_attn2.attention(q, k, v, causal, window_size=(150, 7), softcap=4.0, dropout_p=0.2, rng_state=rng)
    torch.cuda.synchronize()
    print("sanitize cases ran (fwd)")
    raise SystemExit(0)
for dtype in (torch.bfloat16, torch.float16):
    for d, nq, nk, hq, hkv, causal in [(64, 17, 33, 4, 2, True), (128, 130, 70, 2, 1, True),
                                       (72, 65, 65, 2, 2, False), (256, 33, 129, 2, 2, False),
                                       (32, 1, 200, 2, 2, True), (128, 40, 300, 2, 1, False)]:
        if only_kvcache:
            break
        q = torch.randn(2, hq, nq, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attn2.attention(q, k, v, causal)
        out.backward(torch.randn_like(out))
        slopes = torch.rand(2, hq, device="cuda")
        out = flash_attn2.attention(q, k, v, causal, window_size=(20, 5), softcap=4.0, alibi_slopes=slopes,
                                    dropout_p=0.2, rng_state=rng)
        out.backward(torch.randn_like(out))
        out, lse = flash_attn2.attention_with_lse(q.detach(), k.detach(), v.detach(), causal, window_size=(9, -1))
        torch.ops.flash_attn2.bwd(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, causal, None,
                                  window_size=[9, -1], deterministic=True)
        lengths = [5, 0, nq, 1]
        cu = torch.tensor([0, 5, 5, 5 + nq, 6 + nq], dtype=torch.int32, device="cuda")
        qp = torch.randn(6 + nq, hq, d, device="cuda", dtype=dtype, requires_grad=True)
        kp = torch.randn(6 + nq, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
        vp = torch.randn(6 + nq, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attn2.attention_varlen(qp, kp, vp, cu, cu, nq, nq, causal, softcap=3.0, dropout_p=0.1,
                                           rng_state=rng)
        out.backward(torch.randn_like(out))
    # KV cache: dense and paged (pages of 16, 128, 256), appending 3 keys, 1, 5, 24 and 40 splits, GQA 4:1 and 1:1,
    # a sequence with an empty cache and one filled to capacity; 68 and 64 packed rows take the kernel whose warps
    # split rows; d128 16-row tiles on pages of 16 keys or more the staggered loop (a thread's run of 16 rows in one
    # page, its entry read a tile ahead; capacities off a 128-key tile: runs past the table's row), pages of 8 the
    # stages.
    for d, hq, hkv, nq, page, cap in [] if skip_kvcache else [
            (64, 8, 2, 1, None, 64), (128, 4, 4, 3, 16, 64), (256, 8, 2, 17, 16, 64), (96, 2, 1, 2, None, 64),
            (128, 32, 8, 16, None, 64), (128, 8, 2, 1, 128, 768), (128, 8, 1, 2, 256, 1024),
            (128, 16, 4, 1, 32, 352), (128, 8, 8, 1, 64, 192), (128, 8, 2, 2, 8, 136)]:
        if page is None:
            kc = torch.randn(2, cap, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
            vc = torch.randn(2, cap, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
            table = None
        else:
            kc = torch.randn(2 * cap // page + 1, page, hkv, d, device="cuda", dtype=dtype)
            vc = torch.randn_like(kc)
            table = torch.randperm(kc.shape[0], device="cuda")[: 2 * cap // page].view(2, -1).int()
        q = torch.randn(2, hq, nq, d, device="cuda", dtype=dtype)
        kn = torch.randn(2, hkv, 3, d, device="cuda", dtype=dtype)
        lens = torch.tensor([0, cap - 3], dtype=torch.int32, device="cuda")
        for splits in (1, 5, 24, 40):  # 24 and 40: the combine's per-warp weight copies, and several LSEs a lane
            flash_attn2.attention_kvcache(q, kc, vc, kn, torch.randn_like(kn), lens, table, True, window_size=(30, 0),
                                          softcap=2.0, alibi_slopes=torch.rand(hq, device="cuda"), num_splits=splits)
        if table is None:  # the plain op's split-KV path (Nq <= 16) on the same tensors
            flash_attn2.attention(q, kc, vc)
    # Splits of 8 key tiles or more (their L2 prefetch before the PDL wait), dense caches of both layouts filled to
    # capacity by the append and not, steps back to back with each query the previous output.
    for d in [] if skip_kvcache else (64, 128, 256):
        cap = 1100
        for kc in (torch.randn(2, cap, 2, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2),
                   torch.randn(2, 2, cap, d, device="cuda", dtype=torch.bfloat16)):
            vc = torch.randn_like(kc)
            q = torch.randn(2, 8, 1, d, device="cuda", dtype=torch.bfloat16)
            kn = torch.randn(2, 2, 3, d, device="cuda", dtype=torch.bfloat16)
            lens = torch.tensor([cap - 3, 700], dtype=torch.int32, device="cuda")
            for splits in (1, 2):
                q = flash_attn2.attention_kvcache(q, kc, vc, kn, torch.randn_like(kn), lens, None, True,
                                                  num_splits=splits)[0]
                q = flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, None, num_splits=splits)[0]
torch.cuda.synchronize()
print("sanitize cases ran")
