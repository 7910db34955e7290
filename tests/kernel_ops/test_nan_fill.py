"""The kernel tests' outputs start as NaN (conftest.py), so an element that a kernel never writes shows up."""

import torch

from engram.kernels.dispatch import kernel_output
from engram.kernels.sinkhorn import triton_sinkhorn
from engram.kernels.sinkhorn.naive import naive_sinkhorn


def test_outputs_start_as_nan_or_the_integer_minimum(device):
    assert kernel_output((2, 3), torch.bfloat16, device).isnan().all()
    assert (kernel_output((4,), torch.int64, device) == torch.iinfo(torch.int64).min).all()


class SkipsLastMatrix:
    """A launcher of the Sinkhorn forward kernel that tells it there is one token fewer than there is."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda logits, out, tokens, *args, **kwargs: launch(logits, out, tokens - 1, *args, **kwargs)


def test_an_unwritten_element_fails_the_comparison(device, monkeypatch):
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    monkeypatch.setattr(triton_sinkhorn, "_sinkhorn_fwd_kernel", SkipsLastMatrix(triton_sinkhorn._sinkhorn_fwd_kernel))
    out = triton_sinkhorn.sinkhorn_fwd(logits, iters=3)
    assert out[-1].isnan().all()
    torch.testing.assert_close(out[:-1], naive_sinkhorn(logits, 3)[:-1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, naive_sinkhorn(logits, 3), equal_nan=False)
