"""Megatron-core dist checkpoints as files: names, finding, listing, integrity, the common state, writing.

The one home of what training, inference and conversion all need to know about a `dist_checkpointing`
(torch_dist) directory. Training's save/resume policy (rotation, the resume rule, health set-asides) is in
training/checkpointing.py, above this layer; the HF <-> megatron-core tables and streaming are beside it
(mcore_io.py, hf_io.py, tables.py, families.py).

Layout of a save directory:

    <save>/iter_0000100/      one checkpoint (dist_checkpointing directory: metadata.json, shards, common)
    <save>/latest             the step of the newest complete checkpoint (text)
    <save>/.tmp_iter_0000200/ a save in progress: renamed to iter_0000200 only once complete
    <save>/COMPLETE           written when the run reached train.steps (JSON: step, time, job)

megatron-core is imported inside the functions that use it: `nbdiff convert --help` imports this module
(through convert.mcore_to_hf and checkpoint.mcore_io) and must not load megatron-core
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nbdiff_megatron.errors import CheckpointError, checkpoint_read_errors
from nbdiff_megatron.megatron_compat import cuda_to_cpu

CHECKPOINT_PREFIX = "iter_"


TMP_PREFIX = ".tmp_"


LATEST_FILE = "latest"


COMPLETE_FILE = "COMPLETE"


FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint written after `step` optimizer steps."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def process_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete_checkpoint(path: str | Path) -> bool:
    """True if `path` is a finished dist_checkpointing directory (its metadata.json is readable)."""
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint

    path = Path(path)
    return path.is_dir() and check_is_distributed_checkpoint(str(path))


def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a save directory, oldest first, as (step, path)."""
    save_dir = Path(save_dir)
    found = []
    if not save_dir.is_dir():
        return found
    for child in save_dir.iterdir():
        if not child.name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            step = int(child.name[len(CHECKPOINT_PREFIX) :])
        except ValueError:
            continue
        if is_complete_checkpoint(child):
            found.append((step, child))
    return sorted(found)


def find_checkpoint(path: str | Path) -> Path:
    """Resolve `--load PATH` to one checkpoint directory, or raise CheckpointError saying why.

    PATH is either a checkpoint directory itself or a save directory (its `latest` checkpoint, or the
    newest complete one when `latest` is missing).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a save directory or one of its "
            f"{CHECKPOINT_PREFIX}XXXXXXX sub-directories to --checkpoint.load"
        )
    if is_complete_checkpoint(path):
        return path
    if path.name.startswith(CHECKPOINT_PREFIX) or path.name.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt (no readable metadata.json: the save that "
            "wrote it was probably interrupted); load the save directory to use its newest "
            "complete checkpoint"
        )
    latest = path / LATEST_FILE
    if latest.is_file():
        text = latest.read_text().strip()
        try:
            candidate = path / checkpoint_name(int(text))
        except ValueError:
            raise CheckpointError(
                f"{latest} holds {text!r}, not a step number; delete it to use the newest complete "
                "checkpoint"
            ) from None
        if is_complete_checkpoint(candidate):
            return candidate
        raise CheckpointError(
            f"{latest} points to {candidate.name}, which is missing or incomplete; delete {latest} to "
            "fall back to the newest complete checkpoint"
        )
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path}: expected {CHECKPOINT_PREFIX}XXXXXXX sub-directories written by "
            "`nbdiff train --checkpoint.save=DIR`"
        )
    return found[-1][1]


def model_description(ckpt: str | Path) -> str:
    """Where the model shape of a checkpoint is written, for error messages: the converter's
    `model.yaml` or the training run's `config.yaml` (model section), beside the checkpoint."""
    ckpt = Path(ckpt)
    for folder in (ckpt, ckpt.parent):
        for name in ("model.yaml", "config.yaml"):
            if (folder / name).is_file():
                section = "" if name == "model.yaml" else " (its model section)"
                return f"{folder / name}{section}"
    return "the model shape it was written with"


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The train_state of a checkpoint `nbdiff train` wrote: step, data position, config, layout."""
    common = read_common_state(path)
    info = common.get("train_state")
    if not isinstance(info, dict) or "step" not in info:
        raise CheckpointError(
            f"checkpoint {path} was not written by `nbdiff train` (no train_state); "
            "to start from converted weights use --checkpoint.finetune=true"
        )
    return info


def device_mode() -> contextlib.AbstractContextManager:
    """The scope of every dist_checkpointing call: on a CPU, its literal CUDA devices (the
    `fully_reshardable` gather's `.cuda()` tensors) are the CPU's; a no-op with CUDA."""
    return cuda_to_cpu()


def _save_kwargs(save_fn: Any) -> dict[str, Any]:
    """Version differences of `dist_checkpointing.save`: 0.19.x defaults `async_strategy` to 'nvrx'
    (nvidia-resiliency-ext, rarely installed); 'mcore' is megatron-core's own. 0.16.1 has no such
    argument."""
    params = inspect.signature(save_fn).parameters
    return {"async_strategy": "mcore"} if "async_strategy" in params else {}


def _write_results_queue(asynchronous: bool) -> None:
    """The queue through which the writer's processes return their write results to the trainer.

    megatron-core creates it on a spawn `Manager`: an extra process, started on the first save, that
    outlives a trainer killed with SIGKILL (holding its stdout open) and costs ~1.4 s to start. A
    synchronous save writes from this process and its forked workers: a plain `queue.Queue` does. An
    asynchronous one writes from a forked child: a fork-context queue, created here before the fork.
    """
    try:
        # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # another megatron-core layout: keep its own queue
        return
    global _FORK_QUEUE
    if asynchronous:
        if _FORK_QUEUE is None:
            _FORK_QUEUE = multiprocessing.get_context("fork").Queue()
        filesystem_async._results_queue = _FORK_QUEUE
    elif not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()


_FORK_QUEUE: Any = None


class AsyncWriter:
    """The checkpoint writes in flight of an `async_save` run: megatron-core's `AsyncCallsQueue` with
    its non-persistent caller (one forked writer process per save; the persistent caller spawns a
    worker that needs CUDA). All ranks call every method, at the same points of the run."""

    def __init__(self) -> None:
        # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)

    @property
    def in_flight(self) -> int:
        """Saves scheduled and not yet finalised."""
        return self._calls.get_num_unfinalized_calls()

    def schedule(self, request: Any) -> None:
        with device_mode():
            self._calls.schedule_async_request(request)

    def finalize(self, *, wait: bool) -> None:
        """Run the finalisation of every save whose writes have finished on all ranks (with `wait`:
        wait for all of them first)."""
        if self.in_flight:
            with device_mode():
                self._calls.maybe_finalize_async_calls(blocking=wait)


def write_dist_checkpoint(
    state: dict[str, Any],
    directory: str | Path,
    *,
    finalize: Callable[[], None] | None = None,
    writer: AsyncWriter | None = None,
    parallel_group: Any = None,
) -> None:
    """Write `state` as a dist checkpoint into `directory` (every save of this project runs this).

    The write is megatron-core's async request, run at once in this process (`writer` None) or handed
    to `writer` (the shards are written by a forked process while training goes on). Either way
    `finalize` runs on every rank once every rank's writes have finished and metadata.json is written:
    the same code for both. With `parallel_group` (the data-parallel group) megatron-core's fully
    parallel strategy spreads the writes of replicated tensors over its ranks (otherwise the first
    replica writes them all). CUDA device arguments are mapped to the CPU on a CPU.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy()
    if parallel_group is not None:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_group)
    _write_results_queue(asynchronous=writer is not None)
    with device_mode():
        request = dist_checkpointing.save(
            state,
            str(directory),
            sharded_strategy=strategy,
            async_sharded_save=True,
            **_save_kwargs(dist_checkpointing.save),
        )
    if finalize is not None:
        request.add_finalize_fn(finalize)
    if writer is None:
        with device_mode():
            request.execute_sync()
    else:
        writer.schedule(request)


def load_strategy(ckpt: str | Path, parallel_group: Any = None) -> Any:
    """The sharded load strategy for `ckpt`: megatron-core's default, wrapped in its fully parallel
    strategy over `parallel_group` when given (each shard is read by one rank of the group and
    exchanged); None (= megatron-core's default) without a group."""
    if parallel_group is None:
        return None
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(ckpt)), parallel_group
    )


def short_error(exc: BaseException) -> str:
    """The gist of an error whose text may be a whole remote traceback: its last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def damaged_shard_files(ckpt: Path, metadata: Any = None) -> list[Path]:
    """Shard files of a torch_dist checkpoint that are missing or shorter than its index says
    (a save that did not finish, an incomplete copy); [] when the index itself is unreadable."""
    try:
        if metadata is None:
            # lazy: torch.distributed.checkpoint takes ~0.8 s to import; convert --help imports dist.py
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(ckpt)).read_metadata()
        storage = metadata.storage_data
    except Exception:
        return []
    needed: dict[str, int] = {}
    for info in storage.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return [
        Path(ckpt) / name
        for name, end in sorted(needed.items())
        if not (Path(ckpt) / name).is_file() or (Path(ckpt) / name).stat().st_size < end
    ]


def truncated_message(damaged: list[Path]) -> str:
    """One message naming the first damaged file and the fix."""
    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
    return (
        f"checkpoint file {damaged[0]} is truncated or missing{more}: the save did not finish "
        "or the copy is incomplete; copy the checkpoint again or use an earlier one"
    )


def read_common_state(ckpt: str | Path) -> dict[str, Any]:
    """The common (non-tensor) state of a dist checkpoint; CheckpointError naming the damaged file
    when a shard is truncated (megatron-core >= 0.19 keeps the common state in the shards)."""
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except checkpoint_read_errors() as exc:
        raise_if_truncated(ckpt)
        raise CheckpointError(
            f"cannot read the common state of checkpoint {ckpt} ({short_error(exc)}); the checkpoint is "
            "corrupt or not a megatron-core dist_checkpointing directory: load an earlier one"
        ) from None
    return common if isinstance(common, dict) else {}


def raise_if_truncated(ckpt: str | Path, metadata: Any = None) -> None:
    """Raise CheckpointError naming the damaged shard file, when that is why a read failed."""
    damaged = damaged_shard_files(Path(ckpt), metadata)
    if damaged:
        raise CheckpointError(truncated_message(damaged)) from None
