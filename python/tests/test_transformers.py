"""flash_attn2 as a transformers attention implementation: tiny random-weight Llama, Mistral, Qwen2 (sliding
window) and Gemma 2 (softcap + window) models against transformers' own attention, in float32 on the CPU kernel
(and bf16 on CUDA when present): logits, loss and every parameter gradient with padded batches of mixed lengths and
with a packed batch, and greedy generate() tokens."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_attn2.integrations import transformers as fa2_transformers  # noqa: E402

NAME = fa2_transformers.register()


def tiny_config(kind):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(head_dim=16, **common)
    if kind == "mistral":
        return transformers.MistralConfig(head_dim=16, sliding_window=7, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                        layer_types=["full_attention", "sliding_attention"], **common)
    if kind == "gemma2":
        return transformers.Gemma2Config(head_dim=16, sliding_window=5, attn_logit_softcapping=20.0,
                                         final_logit_softcapping=None, query_pre_attn_scalar=12, **common)
    raise ValueError(kind)


# transformers' SDPA path ignores Gemma 2's softcap, so Gemma 2 is compared with its eager attention.
REFERENCE = {"llama": "sdpa", "mistral": "sdpa", "qwen2": "sdpa", "gemma2": "eager"}


def model_pair(kind, device, dtype):
    torch.manual_seed(0)
    # one config each: from_config records the implementation in the config it is given
    ours = transformers.AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=NAME).to(device, dtype)
    ref = transformers.AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=REFERENCE[kind])
    ref = ref.to(device, dtype)
    ref.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == NAME and ref.config._attn_implementation == REFERENCE[kind]
    return ours, ref


def padded_batch(device, side):
    """Three sequences of lengths 13, 7 and 10, padded on `side` to 13."""
    gen = torch.Generator().manual_seed(1)
    lengths, n = [13, 7, 10], 13
    ids = torch.zeros(3, n, dtype=torch.long)
    mask = torch.zeros(3, n, dtype=torch.long)
    for i, length in enumerate(lengths):
        tokens = torch.randint(1, 97, (length,), generator=gen)
        sl = slice(n - length, n) if side == "left" else slice(0, length)
        ids[i, sl], mask[i, sl] = tokens, 1
    return ids.to(device), mask.to(device)


def compare(ours, ref, inputs, device, tol):
    out_a = ours(**inputs)
    out_b = ref(**inputs)
    keep = inputs.get("attention_mask")
    la, lb = out_a.logits, out_b.logits
    if keep is not None:  # padded positions' logits are not defined the same way by every implementation
        la, lb = la[keep.bool()], lb[keep.bool()]
    assert (la - lb).abs().max() < tol, f"logits differ by {(la - lb).abs().max():.3e}"
    assert (out_a.loss - out_b.loss).abs() < tol, f"loss {out_a.loss} vs {out_b.loss}"
    out_a.loss.backward()
    out_b.loss.backward()
    for (name, pa), (_, pb) in zip(ours.named_parameters(), ref.named_parameters()):
        if pa.grad is None and pb.grad is None:
            continue
        scale = pb.grad.abs().max().clamp_min(1e-6)
        assert ((pa.grad - pb.grad).abs().max() / scale) < tol * 10, f"gradient of {name}"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_reference(kind, side, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = 2e-4 if device == "cpu" else 5e-2
    ours, ref = model_pair(kind, device, dtype)
    ids, mask = padded_batch(device, side)
    # A label counts only where its predicting position is a real token too (with left padding, the position before
    # a sequence's first token is padding, whose logits no implementation defines the same way).
    prev_real = torch.nn.functional.pad(mask[:, :-1], (1, 0))
    labels = ids.masked_fill((mask == 0) | (prev_real == 0), -100)
    compare(ours, ref, dict(input_ids=ids, attention_mask=mask, labels=labels), device, tol)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_batch_matches_separate_sequences(kind):
    """Three sequences packed into one row with restarting position_ids (and, separately, cu_seq_lens kwargs):
    the same logits as running each sequence alone."""
    ours, _ = model_pair(kind, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 9, 4]
    seqs = [torch.randint(1, 97, (n,), generator=gen) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = ours(input_ids=ids, position_ids=pos).logits[0]
    cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    with_cu = ours(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                   max_length_k=9).logits[0]
    start = 0
    for s in seqs:
        alone = ours(input_ids=s[None]).logits[0]
        assert (packed[start : start + len(s)] - alone).abs().max() < 2e-4
        assert (with_cu[start : start + len(s)] - alone).abs().max() < 2e-4
        start += len(s)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_greedy_generate_matches_reference(kind):
    """32 greedy steps with the KV cache (one query per step over the cache), left-padded batch."""
    ours, ref = model_pair(kind, "cpu", torch.float32)
    ids, mask = padded_batch("cpu", "left")
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ours.generate(ids, **kw)
        b = ref.generate(ids, **kw)
    assert torch.equal(a, b)


def test_training_dropout_reaches_the_op():
    ours, _ = model_pair("llama", "cpu", torch.float32)
    for layer in ours.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ours.train()
    ids, mask = padded_batch("cpu", "right")
    torch.manual_seed(3)
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = ours(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b), "dropout must draw a new mask per call"
    ours.eval()
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits)


def test_register_refuses_flash_names():
    with pytest.raises(ValueError, match="contains 'flash'"):
        fa2_transformers.register("flash_attn2")


def test_training_step_benchmark_smoke(capsys):
    """scripts/bench_transformers.py end to end on a tiny model (eager, CPU): every implementation, both batch
    kinds, the same first loss."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_transformers.py"
    spec = importlib.util.spec_from_file_location("bench_transformers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--device", "cpu", "--tiny", "--no-compile", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for kind in ("full", "padded"):
        assert f"| {kind} | {NAME} |" in out and f"| {kind} | sdpa |" in out
    losses = [float(line.split("|")[5]) for line in out.splitlines() if line.startswith("| full |")]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-4  # ours, sdpa, sdpa with the provider
