"""Context-parallel benchmark: flash_attn2.distributed.ring_attention on W GPUs (NCCL) beside our single-GPU
kernel on the whole sequence and PyTorch's context_parallel with SDPA, in the same run.

    python scripts/bench_context_parallel.py --gpus 2 [--seqlens 32768,65536,131072] [--out cp.md]
    python scripts/bench_context_parallel.py --device cpu --gpus 2 --seqlens 256   # gloo smoke test

B = 1, Hq = 32, Hkv = 8, D = 128, bf16, causal, zigzag layout. Per row: step time (CUDA-event medians of rank 0,
ranks synchronised) forward and forward + backward; per-GPU TFLOP/s = (causal FLOPs of the whole sequence / W)
/ time, beside the single-GPU TFLOP/s of our kernel on the whole sequence (the same work on one GPU) and their
ratio (the issue's bar: >= 0.85 at N >= 64k); peak memory per GPU; and context_parallel + SDPA (flash and cuDNN
backends, K/V heads repeated since its SDPA path is not given enable_gqa) per-GPU TFLOP/s.
FLOPs: fwd = 4 B Hq N^2 D / 2 (causal), fwd + bwd = 3.5 x fwd.
"""

import argparse
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _median_ms(fn, device, warmup=2, reps=5, synchronise_ranks=True):
    """Median ms of fn; with synchronise_ranks every repetition starts after a barrier of all ranks."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if synchronise_ranks:
            dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _worker(rank, world, init_file, args):
    import flash_attn2
    import flash_attn2.distributed as cp

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    b, hq, hkv, d = 1, 32, 8, 128
    lines = []
    for n in args.seqlens:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
        dout = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=gen)
        fwd_flops = 4 * b * hq * n * n * d / 2
        row = {"N": n}
        ql, kl, vl = (cp.shard(t, layout="zigzag").requires_grad_() for t in (q, k, v))
        dl = cp.shard(dout, layout="zigzag")
        for method in ("ring", "allgather"):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fwd = _median_ms(lambda: cp.ring_attention(ql, kl, vl, True, method=method), device)
            both = _median_ms(lambda: torch.autograd.grad(cp.ring_attention(ql, kl, vl, True, method=method),
                                                          (ql, kl, vl), dl), device)
            row[method] = (fwd, both, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
        if rank == 0:  # the same whole-sequence work on one GPU
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            fwd = _median_ms(lambda: flash_attn2.attention(qs, ks, vs, True), device, synchronise_ranks=False)
            both = _median_ms(lambda: torch.autograd.grad(flash_attn2.attention(qs, ks, vs, True), (qs, ks, vs), dout),
                              device, synchronise_ranks=False)
            row["single"] = (fwd, both)
        row["cp_sdpa"] = _context_parallel_sdpa(q, k, v, dout, world, device) if cuda else {}
        if rank == 0:
            tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
            s_f, s_b = tf(fwd_flops, row["single"][0]), tf(3.5 * fwd_flops, row["single"][1])
            for method in ("ring", "allgather"):
                f, fb, mem = row[method]
                pf, pb = tf(fwd_flops / world, f), tf(3.5 * fwd_flops / world, fb)
                cps = "; ".join(f"{k2} {tf(fwd_flops / world, v2[0]):.0f} / {tf(3.5 * fwd_flops / world, v2[1]):.0f}"
                                if isinstance(v2, tuple) else f"{k2}: {v2}" for k2, v2 in row["cp_sdpa"].items())
                line = (f"| {n} | {world} | {method} | {f:.2f} | {fb:.2f} | {pf:.0f} | {pb:.0f} | {s_f:.0f} | {s_b:.0f} | "
                        f"{pf / s_f:.2f} | {pb / s_b:.2f} | {mem:.1f} | {cps or '—'} |")
                print(line, flush=True)
                lines.append(line)
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0 and args.out:
        with open(args.out, "w") as fh:
            fh.write(HEADER + "\n" + "\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _context_parallel_sdpa(q, k, v, dout, world, device):
    """PyTorch's experimental context_parallel with SDPA on the same problem: {backend: (fwd ms, fwd+bwd ms)},
    or the reason it did not run."""
    results = {}
    try:
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return {"unavailable": str(e)}
    group = q.shape[1] // k.shape[1]
    mesh = init_device_mesh("cuda", (world,))
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            qc, kc, vc, dc = (t.clone() for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), dout))
            with context_parallel(mesh, buffers=[qc, kc, vc, dc], buffer_seq_dims=[2, 2, 2, 2]), sdpa_kernel(backend):
                # The buffers are resized in place when the context exits: differentiate through views of them.
                qg, kg, vg = (t.detach().requires_grad_() for t in (qc, kc, vc))
                fwd = _median_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), device)
                both = _median_ms(lambda: torch.autograd.grad(
                    F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), dc), device)
            results[name] = (fwd, both)
        except Exception as e:  # report, do not fail the benchmark
            results[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
    return results


HEADER = ("| N | GPUs | method | fwd ms | fwd+bwd ms | fwd TFLOP/s per GPU | fwd+bwd TFLOP/s per GPU | single-GPU fwd | "
          "single-GPU fwd+bwd | fwd ratio | fwd+bwd ratio | peak GiB per GPU | context_parallel + SDPA per GPU "
          "(fwd / fwd+bwd) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seqlens", type=lambda x: [int(n) for n in x.split(",")], default=[32768, 65536, 131072])
    parser.add_argument("--out")
    args = parser.parse_args()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.gpus, os.path.join(tmp, "init"), args), nprocs=args.gpus, join=True,
                           start_method="spawn")


if __name__ == "__main__":
    main()
