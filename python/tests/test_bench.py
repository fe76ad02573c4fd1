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
