"""Context parallelism on gloo: 2 and 4 CPU processes, every rank's out, LSE-consistent merge and dq/dk/dv
against the single-process op on the gathered sequence (causal and not, sliding windows, both layouts, both
methods, GQA, local lengths that are no multiple of any tile, float64 and float32)."""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NO_WINDOW = (-1, -1)
CASES = [
    # (dtype, B, Hq, Hkv, N_local, D, causal, layout, method, softcap, window_size)
    (torch.float64, 1, 4, 2, 38, 16, True, "zigzag", "ring", 0.0, NO_WINDOW),
    (torch.float64, 2, 2, 2, 38, 8, False, "zigzag", "ring", 0.0, NO_WINDOW),
    (torch.float64, 1, 4, 1, 19, 16, True, "contiguous", "ring", 0.0, NO_WINDOW),
    (torch.float64, 1, 2, 2, 20, 16, False, "contiguous", "ring", 2.0, NO_WINDOW),
    (torch.float32, 1, 4, 2, 70, 32, True, "zigzag", "ring", 0.0, NO_WINDOW),
    (torch.float32, 1, 4, 2, 70, 32, True, "zigzag", "allgather", 0.0, NO_WINDOW),
    (torch.float64, 2, 4, 1, 22, 16, True, "contiguous", "allgather", 3.0, NO_WINDOW),
    (torch.float64, 1, 2, 2, 22, 16, False, "zigzag", "allgather", 0.0, NO_WINDOW),
    # sliding windows in global positions: narrower than a chunk, wider than one, one-sided, two-sided
    (torch.float64, 1, 4, 2, 38, 16, True, "zigzag", "ring", 0.0, (7, -1)),
    (torch.float64, 1, 4, 2, 38, 16, True, "zigzag", "ring", 2.0, (30, -1)),
    (torch.float64, 1, 2, 2, 20, 8, False, "contiguous", "ring", 0.0, (5, 3)),
    (torch.float64, 1, 2, 1, 22, 8, False, "zigzag", "ring", 0.0, (-1, 4)),
    (torch.float64, 2, 4, 2, 26, 16, False, "zigzag", "allgather", 0.0, (9, 17)),
    (torch.float32, 1, 4, 2, 38, 32, True, "contiguous", "allgather", 0.0, (12, -1)),
]


NCCL_CASES = [
    (torch.bfloat16, 1, 8, 2, 1000, 128, True, "zigzag", "ring", 0.0, NO_WINDOW),
    (torch.bfloat16, 2, 4, 4, 384, 64, False, "contiguous", "ring", 0.0, NO_WINDOW),
    (torch.bfloat16, 1, 8, 1, 640, 128, True, "zigzag", "allgather", 0.0, NO_WINDOW),
    (torch.float16, 1, 4, 2, 130, 256, True, "contiguous", "ring", 30.0, NO_WINDOW),
    (torch.bfloat16, 1, 8, 2, 1000, 128, True, "zigzag", "ring", 0.0, (300, -1)),
]


def _nccl_case(rank, i, case, world):
    """bf16 / fp16 on NCCL: every rank's shard within the pass rule of the single-GPU op (both vs float64)."""
    import flash_attn2
    import flash_attn2.distributed as cp

    dtype, b, hq, hkv, n_local, d, causal, layout, method, softcap, window = case
    dev = torch.device("cuda", rank)
    gen = torch.Generator().manual_seed(200 + i)
    n = n_local * world
    full = [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq)]
    q64, k64, v64 = (t.clone().requires_grad_() for t in full[:3])
    ref = flash_attn2.attention(q64, k64, v64, causal, softcap=softcap, window_size=window)
    ref.backward(full[3])
    q, k, v = (t.to(dev, dtype).requires_grad_() for t in full[:3])
    single = flash_attn2.attention(q, k, v, causal, softcap=softcap, window_size=window)
    single.backward(full[3].to(dev, dtype))
    ql, kl, vl = (cp.shard(t.detach(), layout=layout).requires_grad_() for t in (q, k, v))
    out = cp.ring_attention(ql, kl, vl, causal, layout=layout, method=method, softcap=softcap, window_size=window)
    out.backward(cp.shard(full[3].to(dev, dtype), layout=layout))
    for name, ours, theirs, r in (("out", out, single, ref), ("dq", ql.grad, q.grad, q64.grad),
                                  ("dk", kl.grad, k.grad, k64.grad), ("dv", vl.grad, v.grad, v64.grad)):
        r_local = cp.shard(r.detach().to(dev), layout=layout).double()
        err = (ours.detach().double() - r_local).abs().max().item()
        single_err = (cp.shard(theirs.detach(), layout=layout).double() - r_local).abs().max().item()
        assert err <= 2 * single_err + 1e-3, (f"{name} case {i} {layout}/{method} rank {rank}: error {err:.3e}, "
                                              f"single-GPU op {single_err:.3e}")


def _worker(rank, world, init_file, result_file, backend="gloo"):
    try:
        import flash_attn2
        import flash_attn2.distributed as cp

        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            for i, case in enumerate(NCCL_CASES):
                _nccl_case(rank, i, case, world)
            dist.barrier()
            dist.destroy_process_group()
            return
        for i, (dtype, b, hq, hkv, n_local, d, causal, layout, method, softcap, window) in enumerate(CASES):
            gen = torch.Generator().manual_seed(100 + i)  # the same full tensors on every rank
            n = n_local * world
            q = torch.randn(b, hq, n, d, generator=gen, dtype=dtype, requires_grad=True)
            k = torch.randn(b, hkv, n, d, generator=gen, dtype=dtype, requires_grad=True)
            v = torch.randn(b, hkv, n, d, generator=gen, dtype=dtype, requires_grad=True)
            dout = torch.randn(b, hq, n, d, generator=gen, dtype=dtype)
            ref = flash_attn2.attention(q, k, v, causal, softcap=softcap, window_size=window)
            ref.backward(dout)

            ql, kl, vl = (cp.shard(t.detach(), layout=layout).requires_grad_() for t in (q, k, v))
            out = cp.ring_attention(ql, kl, vl, causal, layout=layout, method=method, softcap=softcap,
                                    window_size=window)
            out.backward(cp.shard(dout, layout=layout))
            tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
            what = f"case {i} {layout}/{method} causal={causal} window={window} rank {rank}/{world}"
            torch.testing.assert_close(out, cp.shard(ref.detach(), layout=layout), **tol, msg=lambda m: f"out {what}: {m}")
            torch.testing.assert_close(cp.unshard(out.detach(), layout=layout), ref.detach(), **tol)
            for name, local, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
                torch.testing.assert_close(local.grad, cp.shard(full.grad, layout=layout), **tol,
                                           msg=lambda m: f"{name} {what}: {m}")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(f"{result_file}.{rank}", "w") as fh:
            fh.write(traceback.format_exc())
        raise


def _run(world, backend):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        result_file = os.path.join(tmp, "error")
        try:
            mp.start_processes(_worker, args=(world, init_file, result_file, backend), nprocs=world, join=True,
                               start_method="spawn")
        except Exception as e:  # show the rank's own traceback, not only the spawn wrapper's
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("error")]
            raise AssertionError("\n".join(errors) or str(e)) from e


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_on_gloo_matches_the_single_process_op(world):
    _run(world, "gloo")


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(GPUS < 2, reason=f"NCCL context parallelism needs 2 GPUs, this machine has {GPUS}")
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_on_nccl(world):
    if world > GPUS:
        pytest.skip(f"{world} ranks need {world} GPUs, this machine has {GPUS}")
    _run(world, "nccl")


def test_shard_unshard_and_bad_arguments():
    import flash_attn2.distributed as cp

    with pytest.raises(ValueError, match="layout must be one of"):
        cp.shard(torch.zeros(1, 1, 4, 1), layout="striped")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        cp.ring_attention(*(torch.zeros(1, 1, 4, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="even local length"):
        cp.ring_attention(*(torch.zeros(1, 1, 5, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="method must be one of"):
        cp.ring_attention(*(torch.zeros(1, 1, 4, 8) for _ in range(3)), method="tree")
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\) with values >= -1 .* got \(-2, 0\)"):
        cp.ring_attention(*(torch.zeros(1, 1, 4, 8) for _ in range(3)), window_size=(-2, 0))
