"""Exports a small attention model that calls flash_attn2 (torch.export with a dynamic batch and sequence length) and
compiles it with AOTInductor into a .pt2 package that aoti_deploy.cpp loads from C++. Also writes an input and
the eager model's output, as raw float32 with a one-line shape header, for the C++ program to compare against.

    python export_model.py OUT_DIR
"""

import os
import sys

import torch

import flash_attn2  # noqa: F401  (registers torch.ops.flash_attn2.*)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.ops.flash_attn2.fwd(q, k, v, True, None, window_size=[32, 0], softcap=20.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def write_raw(path, t):
    with open(path, "wb") as fh:
        fh.write((" ".join(str(s) for s in t.shape) + "\n").encode())
        fh.write(t.contiguous().to(torch.float32).numpy().tobytes())


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = CausalSelfAttention().eval()
    example = torch.randn(2, 40, 64)
    batch, seq = torch.export.Dim("batch", min=1, max=256), torch.export.Dim("seq", min=2, max=4096)
    with torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch, 1: seq}})
        assert "flash_attn2.fwd" in str(exported.graph), "the op must stay a node of the exported graph"
        package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(out_dir, "model.pt2"))
        x = torch.randn(3, 77, 64)  # another batch and sequence length than the example: dynamic shapes
        write_raw(os.path.join(out_dir, "input.bin"), x)
        write_raw(os.path.join(out_dir, "expected.bin"), model(x))
    print(f"wrote {package}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
