"""megatron-core compatibility: fields it does not know are errors; its import-time noise is dropped; the CPU
patches are idempotent and map CUDA devices and RNG calls to the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nbdiff_megatron import megatron_compat
from nbdiff_megatron.errors import CompatibilityError
from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel
from tests.launch import REPO, clean_env


def test_an_unknown_transformer_config_field_is_an_error_not_dropped() -> None:
    from nbdiff_megatron.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=100, extra_transformer_config={"no_such_field_xyz": 1})
    with pytest.raises(CompatibilityError, match=r"no_such_field_xyz.*model\.extra_transformer"):
        cfg.to_transformer_config()


def test_an_unknown_dataset_config_field_is_an_error_not_dropped() -> None:
    from nbdiff_megatron.data.megatron_io import gpt_dataset_config

    with pytest.raises(CompatibilityError, match=r"GPTDatasetConfig field\(s\) renamed_field"):
        gpt_dataset_config(random_seed=1, sequence_length=8, renamed_field=True)


def test_megatron_core_imports_quietly() -> None:
    code = (
        "from nbdiff_megatron.megatron_compat import quiet_megatron; quiet_megatron(); "
        "import megatron.core.optimizer, megatron.core.models.gpt, megatron.core.distributed"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    assert "not installed" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_megatron_compile_is_deferred_on_a_cpu_and_skips_inductor_at_import() -> None:
    code = (
        "import sys, nbdiff_megatron; nbdiff_megatron.install_compat(); "
        "import torch, megatron.core, megatron.core.models.gpt, "
        "megatron.core.pipeline_parallel; "
        "from megatron.core import jit; "
        "from nbdiff_megatron.megatron_compat import compile_on_first_call as deferred; "
        "from megatron.core.fusions import fused_bias_gelu as g; "
        "assert not torch.cuda.is_available(); "
        "assert jit.jit_fuser is deferred, jit.jit_fuser; "
        "assert torch.compile is not deferred and torch.compile.__module__ == 'torch'; "
        "assert g.bias_gelu.__wrapped__.__name__ == 'bias_gelu', g.bias_gelu; "
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'Inductor was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=clean_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_compile_on_first_call_builds_the_compiled_function_once_when_first_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[dict] = []

    def fake_compile(fn, **options):
        built.append(options)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def add(a, b=1):
        """Adds."""
        return a + b

    bare = megatron_compat.compile_on_first_call(add)
    with_options = megatron_compat.compile_on_first_call(dynamic=False)(add)
    assert built == [] and bare.__name__ == "add" and bare.__doc__ == "Adds."
    assert bare(2, b=3) == ("compiled", 5) and bare(1) == ("compiled", 2)
    assert with_options(4) == ("compiled", 5)
    assert built == [{}, {"dynamic": False}]  # one build each, with the decorator's options
    module = torch.nn.Linear(2, 2)
    megatron_compat.compile_on_first_call(module)
    assert len(built) == 3  # a module is compiled at once, as torch.compile does


cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU patches apply only without CUDA"
)


@cpu_only
def test_cpu_patches_are_idempotent_and_route_current_device() -> None:
    assert megatron_compat.apply_cpu_patches() is True
    assert megatron_compat.apply_cpu_patches() is True
    assert megatron_compat.cpu_patches_applied()
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"


@cpu_only
def test_cuda_to_cpu_mode_maps_literal_devices() -> None:
    with megatron_compat.cuda_to_cpu():
        a = torch.zeros([], dtype=torch.int, device="cuda")
        b = torch.ones(2).to("cuda")
        c = torch.ones(2).cuda()
    assert a.device.type == b.device.type == c.device.type == "cpu"


@cpu_only
def test_rng_tracker_fork_uses_the_cpu_generator() -> None:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    megatron_compat.apply_cpu_patches()
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


@cpu_only
def test_the_gradient_norm_is_the_float64_norm_whatever_the_tensor_length() -> None:
    """megatron-core's CPU fallback took fp32 torch.norm per gradient, which comes out low on a long
    tensor (-1e-5 relative at 1M elements): the same gradient whole (the plain optimizer) and in two
    shards (the distributed optimizer at DP = 2) gave different norms, both below the true one."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    megatron_compat.apply_cpu_patches()
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1 << 20, generator=generator)  # most of the norm, as in the tiny model
    layer = torch.randn(4096, generator=generator)
    true_norm = float(torch.cat([embedding, layer]).double().square().sum().sqrt())
    # A 1-rank group of our own, torn down after: the session's `one_rank` state may be gone (an
    # in-process run on this worker ends with destroy_parallel), and a group left up would change
    # what a later test on this worker starts from.
    started = not parallel_state.model_parallel_is_initialized()
    if started:
        initialize_parallel(1, 1, 1)
    try:
        group = parallel_state.get_model_parallel_group()
        with megatron_compat.cuda_to_cpu():
            whole = get_grad_norm_fp32([embedding, layer], grad_stats_parallel_group=group)
            shards = get_grad_norm_fp32(
                [*embedding.chunk(2), layer], grad_stats_parallel_group=group
            )
    finally:
        if started:
            destroy_parallel()
    assert whole == pytest.approx(true_norm, rel=1e-6)
    assert shards == pytest.approx(true_norm, rel=1e-6)
