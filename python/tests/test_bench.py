"""The main job's outputs: progress lines, the table, --json rows and the PNG plot (and its absence without
matplotlib). CPU only, tiny sizes: this checks the plumbing, not the speed."""

import json
import sys

import pytest

from flash_attn2 import bench


def run(capsys, tmp_path, extra=()):
    bench.main(["--device", "cpu", "--reps", "1", "--cpu-seqlens", "64,128", "--json", str(tmp_path / "r.json"),
                "--plot", str(tmp_path / "r.png"), *extra])
    return capsys.readouterr()


def test_json_progress_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install .[bench])")
    out = run(capsys, tmp_path)
    assert "[4/4] cpu N=128 causal=True" in out.err
    assert "plot: " in out.out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["impl"], r["N"], r["causal"], r["direction"]) for r in rows} == {
        (i, n, c, d) for i in ("flash_attn2", "sdpa") for n in (64, 128) for c in (False, True)
        for d in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = run(capsys, tmp_path)
    assert "plot skipped: matplotlib is not installed" in out.out
    assert "sdpa/ours" in out.out and not (tmp_path / "r.png").exists()


def test_plot_has_decode_panels(tmp_path):
    """Decode rows (as bench_decode_cuda records them) get bandwidth panels beside the TFLOP/s ones."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install .[bench])")
    rows = [dict(device="cuda", dtype="bfloat16", D=128, case="decode", B=b, Hkv=8, L=n, Nq=1, us=10.0 * n / 1024,
                 eager_us=20.0, plain_us=10.0, tbs=3.0, copy_tbs=4.2, sdpa_flash_us=12.0 * n / 1024, sdpa_cudnn_us=None,
                 sdpa_efficient_us=None) for b in (1, 16) for n in (1024, 8192)]
    rows.append(dict(device="cuda", dtype="bfloat16", D=128, causal=False, N=1024, impl="flash_attn2",
                     direction="fwd", tflops=300.0))
    assert bench.write_plot(str(tmp_path / "d.png"), rows)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("with_fa4", [False, True])
def test_grid_rows_match_the_header(with_fa4):
    """The CUDA grid's rows have the header's columns, with ratios to SDPA flash and cuDNN (and FlashAttention-4
    when it ran); an implementation that did not run shows nan, not a crash."""
    header = bench.grid_header(with_fa4)
    f = [600.0, 300.0, 500.0, 150.0] + ([700.0] if with_fa4 else [])
    bw = [400.0, 300.0, float("nan"), 100.0] + ([500.0] if with_fa4 else [])
    row = bench.grid_row("bfloat16", 128, True, 8192, 2, 16, f, bw)
    assert row.count("|") == header.count("|")
    cells = [c.strip() for c in row.strip("|").split("|")]
    names = [c.strip() for c in header.strip("|").split("|")]
    got = dict(zip(names, cells))
    assert got["fwd ours/flash"] == "2.00" and got["fwd ours/cudnn"] == "1.20" and got["bwd ours/cudnn"] == "nan"
    assert ("fwd ours/fa4" in got) == with_fa4
    if with_fa4:
        assert got["fwd fa4"] == "700" and got["bwd ours/fa4"] == "0.80"


def test_flash_attn_4_is_optional(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import flash_attn.cute now raises ImportError
    assert bench.flash_attn_4() is None
    assert "FlashAttention-4: not available" in capsys.readouterr().out
