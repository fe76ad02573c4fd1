"""The build refuses a toolchain that would give a broken library (libstdc++ linked statically into shared
objects), at configure time and with a clear message."""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
GXX = shutil.which("g++")


@pytest.mark.skipif(shutil.which("cmake") is None or GXX is None or shutil.which("readelf") is None,
                    reason="needs cmake, g++ and readelf")
def test_configure_refuses_a_compiler_that_links_libstdcxx_statically(tmp_path):
    wrapper = tmp_path / "g++"
    wrapper.write_text(f"#!/bin/sh\nexec {GXX} -static-libstdc++ \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-DFLASH_ATTN2_WITH_CUDA=OFF",
                             f"-DCMAKE_CXX_COMPILER={wrapper}"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "links libstdc++ statically into shared objects" in message
    assert "CXX=/usr/bin/g++" in message and "FLASH_ATTN2_ALLOW_STATIC_LIBSTDCXX=ON" in message
