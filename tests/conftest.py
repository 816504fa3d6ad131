"""Project-wide test settings: offline, deterministic threads, caches kept out of the home folder;
the 1-rank process group fixture."""

import logging
import os
import tempfile

import pytest

import nbdiff_megatron

# Set before transformers / datasets / lm-eval are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
_cache = tempfile.mkdtemp(prefix="nbdiff-test-cache-")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_cache, "datasets"))
os.environ.setdefault("HF_HOME", os.path.join(_cache, "hf"))
# The process-wide compatibility patches, as the `nbdiff` command installs them (importing the package
# installs nothing: docs/ARCHITECTURE.md), before any test module imports megatron-core. As in the
# command, the CPU patches come with the first model or process group a test builds (model/builder.py,
# model/parallel.py): the xdist controller, which runs no test, never imports megatron-core.
nbdiff_megatron.install_compat(cpu_patches=False)


@pytest.fixture(scope="session")
def one_rank():
    """megatron-core parallel_state with TP = PP = CP = 1 on a 1-process gloo group."""
    import torch
    from megatron.core import parallel_state

    from nbdiff_megatron.model.parallel import initialize_parallel

    torch.set_num_threads(1)
    if not (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    ):
        initialize_parallel(1, 1, 1, seed=1234)
    yield


# ----------------------------------------------------------------------------- deprecation job
# NBDIFF_SHOW_DEPRECATIONS=1 (the CI's deprecation job; docs/megatron-compat.md): warnings that
# pyproject.toml filters out are shown again, and megatron-core's deprecation notices -- warnings and
# log records alike -- are listed once each at the end of the run.
_NOTICES: dict[str, int] = {}


class _NoticeCollector(logging.Handler):
    """Keeps megatron-core's deprecation log records (message -> count)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith("megatron") and "deprecat" in message.lower():
            _NOTICES[message] = _NOTICES.get(message, 0) + 1


# Under pytest-xdist (`make test`) the tests run in worker processes: each worker counts its own
# notices and hands them to the controller when it ends; the controller prints them.
_COUNTED_BY_WORKERS = False


def pytest_configure(config):
    from nbdiff_megatron.megatron_compat import show_deprecations

    global _COUNTED_BY_WORKERS
    _COUNTED_BY_WORKERS = not hasattr(config, "workerinput") and bool(
        getattr(config.option, "numprocesses", None)
    )
    if not show_deprecations():
        return
    for line in ("always::DeprecationWarning", "always::FutureWarning", "always:.*deprecat"):
        config.addinivalue_line("filterwarnings", line)
    logging.getLogger().addHandler(_NoticeCollector(level=logging.WARNING))


def pytest_warning_recorded(warning_message, when, nodeid, location):
    from nbdiff_megatron.megatron_compat import show_deprecations

    if _COUNTED_BY_WORKERS:
        return  # a worker's warning, relayed: that worker counted it
    text = str(warning_message.message)
    if show_deprecations() and "megatron" in str(warning_message.filename):
        _NOTICES[text] = _NOTICES.get(text, 0) + 1


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["nbdiff_notices"] = dict(_NOTICES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: a worker ended; add its notices."""
    for text, count in getattr(node, "workeroutput", {}).get("nbdiff_notices", {}).items():
        _NOTICES[text] = _NOTICES.get(text, 0) + count


def pytest_terminal_summary(terminalreporter):
    if not _NOTICES:
        return
    terminalreporter.section("megatron-core deprecation notices (NBDIFF_SHOW_DEPRECATIONS=1)")
    for message, count in sorted(_NOTICES.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{count:5d} x {message[:300]}")
