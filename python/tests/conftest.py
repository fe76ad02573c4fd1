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
