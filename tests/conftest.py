"""Project-wide test settings: offline, deterministic threads, caches kept out of the home folder;
the 1-rank process group fixture."""

import os
import tempfile

import pytest

# Set before transformers / datasets / lm-eval are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
_cache = tempfile.mkdtemp(prefix="nbdiff-test-cache-")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_cache, "datasets"))
os.environ.setdefault("HF_HOME", os.path.join(_cache, "hf"))


@pytest.fixture(scope="session")
def one_rank():
    """megatron-core parallel_state with TP = PP = CP = 1 on a 1-process gloo group."""
    import torch
    from megatron.core import parallel_state

    from nbdiff_megatron.model.parallel import initialize_parallel

    torch.set_num_threads(1)
    if not (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        initialize_parallel(1, 1, 1, seed=1234)
    yield
