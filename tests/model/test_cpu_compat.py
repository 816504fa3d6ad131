"""cpu_compat: idempotent patches, and the cuda -> cpu device mode."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.model import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="patches apply only without CUDA")


def test_apply_is_idempotent_and_routes_current_device():
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True
    assert cpu_compat.is_applied()
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"


def test_cuda_to_cpu_mode_maps_literal_devices():
    with cpu_compat.cuda_to_cpu():
        a = torch.zeros([], dtype=torch.int, device="cuda")
        b = torch.ones(2).to("cuda")
        c = torch.ones(2).cuda()
    assert a.device.type == b.device.type == c.device.type == "cpu"


def test_rng_tracker_fork_uses_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    cpu_compat.apply()
    tracker = CudaRNGStatesTracker()  # not the global one: other tests rely on its states
    tracker.add("nbdiff-test", 42)
    with tracker.fork("nbdiff-test"):
        first = torch.rand(3)
    outside = torch.rand(3)
    tracker.reset()
    tracker.add("nbdiff-test", 42)
    with tracker.fork("nbdiff-test"):
        again = torch.rand(3)
    assert torch.equal(first, again)
    assert not torch.equal(first, outside)
