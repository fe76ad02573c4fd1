"""A transformers Llama training step with attn_implementation "fa2" (flash_attn2.integrations.transformers) beside
"sdpa" (and "sdpa" with the flash_attn2 SDPA provider active), same process, same weights and data: the #9 bar is
a compiled step at least as fast with ours.

    python scripts/bench_transformers.py                       # CUDA, bf16, compiled, full batch and padded batch
    python scripts/bench_transformers.py --device cpu --tiny --no-compile --steps 2   # smoke test (CI)

Per implementation and batch kind: median step time (forward + backward + AdamW step; CUDA events on CUDA,
wall clock on the CPU) over --steps steps after --warmup, tokens per second, and the first step's loss (the
two implementations must agree to rounding). "padded" gives the sequences lengths from N/2 to N with a 2D
attention mask (our unpadded varlen path vs SDPA's 4D mask).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

PROVIDER = "sdpa + flash_attn2 provider"


def make_config(tiny: bool, seqlen: int):
    import transformers

    if tiny:
        return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seqlen,
                                        pad_token_id=0)
    # hidden 2048, 16 heads of 128, GQA 4:1, 4 layers: attention is a large part of the step at N = 4k
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=seqlen,
                                    pad_token_id=0)


def step_times(impl, args, device, dtype, padded):
    import transformers

    if impl == PROVIDER:  # transformers' "sdpa" with PyTorch's flash kernels replaced by flash_attn2's
        import torch.nn.attention as attn

        import flash_attn2

        before = flash_attn2.sdpa_provider_status()
        attn.activate_flash_attention_impl("flash_attn2")
        try:
            result = step_times("sdpa", args, device, dtype, padded)
        finally:
            attn.restore_flash_attention_impl()
        after = flash_attn2.sdpa_provider_status()
        # Which of SDPA's calls reached the flash path (and so the provider) over all steps, warm-up included.
        print("  provider calls: " + ", ".join(f"{k} {after[k] - before[k]}" for k in after if k != "active"),
              flush=True)
        return result

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(args.tiny, args.seqlen),
                                                          attn_implementation=impl).to(device, dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.seqlen), generator=gen).to(device)
    mask = None
    if padded:
        lengths = torch.linspace(args.seqlen // 2, args.seqlen, args.batch).long()
        mask = (torch.arange(args.seqlen)[None] < lengths[:, None]).long().to(device)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)

    def loss_fn(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    fn = torch.compile(loss_fn) if args.compile else loss_fn
    times, first_loss = [], None
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = fn(ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i == 0:
            first_loss = loss.item()
        if i >= args.warmup:
            times.append(ms)
    tokens = int(mask.sum()) if mask is not None else ids.numel()
    return statistics.median(times), tokens, first_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_transformers: CUDA asked for, but torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.batch, args.seqlen = min(args.batch, 2), min(args.seqlen, 64)

    from flash_attn2.integrations import transformers as fa2_transformers

    ours = fa2_transformers.register()
    print(f"transformers Llama training step, {device} {dtype}, B={args.batch} N={args.seqlen}, "
          f"{'compiled' if args.compile else 'eager'}; median of {args.steps} after {args.warmup} warm-up")
    print("| batch | implementation | step ms | tokens/s | first loss |")
    print("|---|---|---|---|---|")
    for padded in (False, True):
        results = {}
        for impl in (ours, "sdpa", PROVIDER):
            ms, tokens, loss = step_times(impl, args, device, dtype, padded)
            results[impl] = (ms, loss)
            print(f"| {'padded' if padded else 'full'} | {impl} | {ms:.2f} | {tokens / ms * 1e3:.0f} | {loss:.4f} |",
                  flush=True)
        (ms_a, loss_a), (ms_b, loss_b) = results[ours], results["sdpa"]
        print(f"  {'padded' if padded else 'full'}: sdpa / {ours} step time {ms_b / ms_a:.2f} (>= 1: ours faster); "
              f"first losses differ by {abs(loss_a - loss_b):.2e}")


if __name__ == "__main__":
    main()
