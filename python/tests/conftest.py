import pytest
import torch

import flash_attn2  # noqa: F401  (loads the operator library)


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"flash_attn2: CUDA tests run on {torch.cuda.get_device_name()}"
    return "flash_attn2: no CUDA device, CUDA tests are skipped"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

requires_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm_90 GPU (H100 / H200)")


def cuda_kernel_names(fn, contains):
    """The names of the CUDA kernels containing `contains` that fn() launched, as the profiler recorded them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if contains in e.name]
