"""Small helpers the parity tests share: layout moves between PyTorch (NCHW) and jaxdiff (NHWC),
random perturbation of a torch module's weights, and error measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def nchw(x) -> torch.Tensor:
    """NHWC array (numpy or jax) -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms included (default init leaves scale 1 / bias 0 and zero-init
    output convs untested); returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(got, want) -> float:
    """max |got - want| / max |want| (torch tensors or arrays)."""
    if isinstance(want, torch.Tensor):
        want = want.detach().numpy()
    want = np.asarray(want)
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch thread for a module's references (the suite shares 2 cores with XLA's pool). Use as
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patch_randn(monkeypatch, module, tensors):
    """Make `module.randn_tensor` (diffusers' noise source in a pipeline or scheduler module) return
    `tensors` (NHWC numpy, e.g. jaxdiff.rng.request_noise rows) in order, checking each shape. Returns
    the queue: empty afterwards means every tensor was used."""
    queue = list(tensors)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        want = queue.pop(0)
        assert tuple(shape) == (want.shape[0], want.shape[3], want.shape[1], want.shape[2]), shape
        return nchw(want).to(dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", fake)
    return queue
