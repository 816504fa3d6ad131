"""Project-wide test settings: offline, deterministic threads, caches kept out of the home folder;
the 1-rank process group fixture."""

import logging
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


# ----------------------------------------------------------------------------- parallel runs
# `make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadgroup`); a worker is a
# process of its own, so a module- or class-scoped fixture would be built again on every worker
# that runs one of its tests. Tests that share such a fixture therefore form one group, run by one
# worker in file order, as in a serial run: a module's expensive fixture (a trained tiny model, a
# torchrun result) is built once, and a fixture that a conftest.py shares between modules (the
# SLURM cluster of tests/slurm: one slurmctld at a time) is never started twice at once. Explicit
# `xdist_group` marks join the same groups. Session- and package-scoped fixtures (cheap ones: tiny
# models, a small corpus) are built once per worker instead; grouping their many users would
# serialise whole folders.
_SHARED_SCOPES = ("class", "module")


def _explicit_groups(item: pytest.Item) -> set[str]:
    """The names of `item`'s xdist_group marks (pytest-xdist's default name included)."""
    return {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }


def _group_keys(item: pytest.Item) -> set[str]:
    """The shared things `item` uses: its wider-than-function fixtures and its xdist_group marks."""
    keys = {f"mark:{name}" for name in _explicit_groups(item)}
    info = getattr(item, "_fixtureinfo", None)
    for name in info.names_closure if info is not None else ():
        defs = info.name2fixturedefs.get(name)
        if not defs or defs[-1].scope not in _SHARED_SCOPES:
            continue
        fixture = defs[-1]
        # Defined in the test module itself: one instance per module. Defined in a conftest.py: one
        # per module too, but the resource behind it may be single (a cluster): group its users.
        module = item.nodeid.split("::")[0]
        where = module if fixture.baseid.startswith(module) else fixture.baseid
        keys.add(f"fixture:{where}::{name}")
    return keys


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the marks into its scheduling groups
def pytest_collection_modifyitems(config, items):
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    item_keys = [(item, sorted(_group_keys(item))) for item in items]
    for _, keys in item_keys:
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    # pytest-xdist names an item's group by all its xdist_group marks together: every item of a
    # group gets the same marks (the group's explicit ones and its root).
    names: dict[str, set[str]] = {}
    for _, keys in item_keys:
        for key in keys:
            names.setdefault(root(key), {root(key)}).update(
                k.removeprefix("mark:") for k in keys if k.startswith("mark:")
            )
    for item, keys in item_keys:
        if not keys:
            continue
        for name in sorted(names[root(keys[0])] - _explicit_groups(item)):
            item.add_marker(pytest.mark.xdist_group(name))
