"""Training's checkpoint policy on top of checkpoint/dist.py: what a checkpoint of a run holds, save with
keep-last-K, the resume rule, health set-asides and the completion marker.

A checkpoint holds the model, the optimizer, the step, the data position and the RNG states (per rank),
plus the config and parallel layout it was written with. The model and optimizer are stored as sharded
tensors, so a checkpoint saved with one TP/PP layout loads under another; the per-rank RNG states are only
restored when the layout is unchanged (they have no meaning otherwise).

Because every save goes to a temporary name first, a job killed while writing leaves the previous checkpoint
(and `latest`) intact. `<save>/anomalous/` holds checkpoints set aside by a health halt (written after the
last healthy one).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbdiff_megatron.checkpoint import mcore_io
from nbdiff_megatron.checkpoint.dist import (
    COMPLETE_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    TMP_PREFIX,
    barrier,
    checkpoint_name,
    device_mode,
    find_checkpoint,
    list_checkpoints,
    model_description,
    process_rank,
    read_checkpoint_info,
    short_error,
    write_dist_checkpoint,
)
from nbdiff_megatron.errors import CheckpointError, checkpoint_read_errors

ANOMALOUS_DIR = "anomalous"


# ----------------------------------------------------------------------------------- start plan


@dataclass(frozen=True)
class StartPlan:
    """How a run starts, by the one resume rule (docs/resume.md).

    1. `checkpoint.save` holds a complete checkpoint: CONTINUE this run from the newest one there
       (full state), whatever `checkpoint.load` / `checkpoint.finetune` say.
    2. Otherwise `checkpoint.load` names another run: `finetune` loads its weights only and starts at
       step 0 (FINETUNE); without it the other run's full state is resumed into this save dir (RESUME).
    3. Nothing to load: FRESH (also when `load` is this run's own, still empty, save dir).
    """

    mode: str
    """'fresh', 'continue', 'finetune' or 'resume'."""
    path: Path | None
    """The checkpoint directory to load (None when fresh)."""
    note: str
    """One line for the console saying what happens and why."""

    @property
    def weights_only(self) -> bool:
        """True when only the model weights are loaded (step, optimizer, data start afresh)."""
        return self.mode == "finetune"

    @property
    def same_run(self) -> bool:
        """True when this start continues the run whose files are in `checkpoint.save`."""
        return self.mode == "continue"


def _same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def plan_start(save: str | None, load: str | None, finetune: bool) -> StartPlan:
    """Decide how a run starts from its `checkpoint.save`, `.load` and `.finetune` (the resume rule).

    Raises CheckpointError when `load` names nothing usable, with the fix.
    """
    own = list_checkpoints(save) if save else []
    if own:
        step, path = own[-1]
        try:
            read_checkpoint_info(path)
        except CheckpointError:
            raise CheckpointError(
                f"checkpoint.save={save} holds {path.name}, which `nbdiff train` did not write "
                "(converted weights?); save this run to another directory and load that one with "
                f"--checkpoint.load={save} --checkpoint.finetune=true"
            ) from None
        ignored = ""
        if load and not (_same_dir(load, save) or _same_dir(load, path)):
            ignored = f"; checkpoint.load={load} is ignored (this run's own checkpoints come first)"
        elif load and finetune:
            ignored = "; checkpoint.finetune is ignored (it applies to another run's weights)"
        return StartPlan(
            "continue",
            path,
            f"continuing this run from {path} (step {step}; weights, optimizer, data position "
            f"and RNG){ignored}",
        )
    if not load:
        return StartPlan("fresh", None, "starting at step 0 (no checkpoint to load)")
    if save and _same_dir(load, save):
        if finetune:
            raise CheckpointError(
                f"checkpoint.load={load} is this run's own save directory, which holds no complete "
                "checkpoint yet, so checkpoint.finetune=true has no weights to load; point "
                "--checkpoint.load at the previous phase's save directory (or the converted "
                "checkpoint)"
            )
        return StartPlan(
            "fresh", None, f"starting at step 0 ({save} holds no complete checkpoint yet)"
        )
    path = find_checkpoint(load)
    if finetune:
        return StartPlan(
            "finetune",
            path,
            f"starting a new run at step 0 from the weights of {path} (optimizer, schedule and "
            "data start afresh: checkpoint.finetune=true)",
        )
    where = f" into {save}" if save else ""
    return StartPlan(
        "resume",
        path,
        f"resuming the run of {path}{where} (full state: weights, optimizer, data position, RNG; "
        "checkpoint.finetune=false)",
    )


# --------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout() -> dict[str, int]:
    """This process's parallel layout (sizes and ranks), as stored with a checkpoint."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object(state: dict[str, Any] | None):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


# ----------------------------------------------------------------------------------- state dicts


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The megatron model inside DDP wrappers (whose own state-dict keys carry a `module.` prefix)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(chunk, _BaseDataParallel):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model) != 1:
        raise NotImplementedError(
            "virtual pipeline stages (several model chunks) are not supported"
        )
    return _unwrap(model[0]).sharded_state_dict()


# The distributed optimizer's checkpoint layout: megatron-core 0.16's default ('fully_sharded_model_
# space') is deprecated and fails at save ("flattened_range is not supported"); 'dp_reshardable'
# is reshardable over DP only; 'fully_reshardable' (gathered per DP group) reshards across TP / PP
# too, which resuming under another layout needs. Ignored by the other optimizers.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _init_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its (zero) Adam state before a load.

    Its sharded state dict for loading starts from `state_dict()`, which reads every parameter's
    Adam `step`: torch's Adam creates that state lazily at the first step (megatron-core's apex / TE
    Adam have no per-parameter step), so a not-yet-stepped optimizer has none to read.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "data_parallel_group_idx") or opt.init_state_fn is None:
            continue  # not a DistributedOptimizer
        inner = opt.optimizer
        if all(len(inner.state[p]) for g in inner.param_groups for p in g["params"]):
            continue
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


@contextlib.contextmanager
def _keep_adam_steps_in_state_copies(optimizer: Any) -> Iterator[None]:
    """Let megatron-core 0.16's fully reshardable load run with torch's Adam.

    `DistributedOptimizer._set_main_param_and_optimizer_states` copies every key of a parameter's
    optimizer state from the loaded tensors, which never carry torch Adam's per-parameter `step`
    (kept in the param groups; TE / apex Adam have none): a KeyError. Within this scope the copy
    gets the parameter's current step (a no-op copy); `_restore_adam_steps` then sets the loaded one.
    """
    opts = [
        opt
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        if hasattr(opt, "_set_main_param_and_optimizer_states")
    ]
    for opt in opts:
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param: Any, tensors: dict, _opt: Any = opt, _orig: Any = original):
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            step = _opt.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in opts:
            del opt._set_main_param_and_optimizer_states  # the class's method again


def _restore_adam_steps(optimizer: Any) -> None:
    """torch Adam's per-parameter `step` of a loaded distributed optimizer.

    megatron-core 0.16 saves torch Adam's step in the param groups and its dp_reshardable load
    leaves the per-parameter step at the value `_init_distributed_optimizer_state` gave (0), which
    would restart Adam's bias correction: set it from the loaded group step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "data_parallel_group_idx"):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state[param]
                if "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _sharded_state_dict(
    model: list[torch.nn.Module],
    optimizer: Any | None,
    *,
    rng: dict[str, Any] | None,
    include_rng: bool,
    is_loading: bool,
) -> dict[str, Any]:
    state: dict[str, Any] = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        if is_loading:
            _init_distributed_optimizer_state(optimizer)
        with device_mode():  # the fully reshardable layout gathers through device='cuda' buffers
            state["optimizer"] = optimizer.sharded_state_dict(
                state["model"], is_loading=is_loading, metadata=_OPTIMIZER_METADATA
            )
    if include_rng:
        state["rng_state"] = _rng_sharded_object(rng)
    return state


# ------------------------------------------------------------------------------------------ save


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model: list[torch.nn.Module],
    optimizer: Any | None,
    train_state: dict[str, Any],
    *,
    keep_last: int = 3,
    protect: set[int] | frozenset[int] = frozenset(),
) -> Path:
    """Write the checkpoint of `step` under `save_dir` (all ranks call this), atomically.

    `train_state` holds the picklable non-tensor state (data position, config, ...); `step` is added.
    The checkpoint is written to `.tmp_iter_XXXXXXX` and renamed when every rank has finished, then
    `latest` is updated and checkpoints beyond the newest `keep_last` are deleted, except the steps in
    `protect` (the last healthy checkpoint, faults.HealthyCheckpoints).
    """
    from nbdiff_megatron.training import faults

    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if process_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a save that was killed
        tmp.mkdir()
    barrier()
    state = _sharded_state_dict(
        model, optimizer, rng=_rng_state(), include_rng=True, is_loading=False
    )
    state["train_state"] = {
        **train_state,
        "step": int(step),
        "layout": layout(),
        "format_version": FORMAT_VERSION,
    }
    faults.children_die_with_this_process()
    faults.arm_kill_in_write(step)
    write_dist_checkpoint(state, tmp)
    faults.maybe_kill_during_save(step)
    barrier()
    if process_rank() == 0:
        if final.exists():
            shutil.rmtree(final)  # re-saving a step after a resume
        os.replace(tmp, final)
        _write_latest(save_dir, step)
        for old_step, old in list_checkpoints(save_dir)[:-keep_last]:
            if old_step not in protect:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_latest(save_dir: Path, step: int) -> None:
    latest_tmp = save_dir / f"{TMP_PREFIX}{LATEST_FILE}"
    latest_tmp.write_text(f"{step}\n")
    os.replace(latest_tmp, save_dir / LATEST_FILE)


def set_aside(save_dir: str | Path, steps: list[int], healthy: int | None) -> list[Path]:
    """Move the checkpoints of `steps` to <save>/anomalous/ and point `latest` at `healthy`.

    Rank 0 only. A halted run is then continued (resume rule 1) from the healthy checkpoint, and the
    suspect ones stay on disk for a look. Returns the new paths of the moved checkpoints.
    """
    save_dir = Path(save_dir)
    moved = []
    for step in steps:
        src = save_dir / checkpoint_name(step)
        if src.is_dir():
            dst = save_dir / ANOMALOUS_DIR / checkpoint_name(step)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)
            moved.append(dst)
    if healthy is not None:
        _write_latest(save_dir, healthy)
    elif (save_dir / LATEST_FILE).exists() and moved:
        (save_dir / LATEST_FILE).unlink()
    return moved


# ------------------------------------------------------------------------------ completion marker


def read_completion_marker(save_dir: str | Path | None) -> dict[str, Any] | None:
    """The COMPLETE marker of a save directory (JSON with at least `step`), or None."""
    import json

    if not save_dir:
        return None
    path = Path(save_dir) / COMPLETE_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("step"), int) else None


def write_completion_marker(save_dir: str | Path, step: int, extra: dict[str, Any]) -> Path:
    """Write <save>/COMPLETE (atomically): the run reached its last step `step`. Rank 0 only."""
    import json
    import time

    save_dir = Path(save_dir)
    marker = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    tmp = save_dir / f"{TMP_PREFIX}{COMPLETE_FILE}"
    tmp.write_text(json.dumps(marker) + "\n")
    os.replace(tmp, save_dir / COMPLETE_FILE)
    return save_dir / COMPLETE_FILE


def clear_completion_marker(save_dir: str | Path) -> None:
    """Remove the marker (a complete run is continued with a raised train.steps). Rank 0 only."""
    (Path(save_dir) / COMPLETE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ load


def load_checkpoint(
    path: str | Path,
    model: list[torch.nn.Module],
    optimizer: Any | None,
    *,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`), resharding to the current layout if needed.

    `path` is resolved with `find_checkpoint`. `weights_only=True` (fine-tuning the next phase) loads
    only the model weights and returns {'step': 0, ...}; otherwise the optimizer state and, if the
    layout is unchanged, the RNG states are restored too. Returns the checkpoint's train_state.
    Raises CheckpointError with the path and the fix when the checkpoint is missing, corrupt or does
    not match the model.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = find_checkpoint(path)
    try:
        info = read_checkpoint_info(ckpt)
    except CheckpointError:
        if not weights_only:
            raise
        info = {"step": 0}  # converted weights (nbdiff convert) carry no train_state
    same_layout = info.get("layout") == layout()
    include_rng = (not weights_only) and same_layout
    state = _sharded_state_dict(
        model,
        None if weights_only else optimizer,
        rng=None,
        include_rng=include_rng,
        is_loading=True,
    )
    try:
        with device_mode():
            # Entries the checkpoint lacks come back as "unexpected": only `_extra_state` may be
            # (a checkpoint of the local spec loaded under Transformer Engine; mcore_io's rule).
            loaded, _, absent = dist_checkpointing.load(
                state, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED
            )
    except checkpoint_read_errors() as exc:
        raise CheckpointError(
            f"cannot load checkpoint {ckpt}: {short_error(exc)}. The checkpoint is corrupt or was "
            f"written for a different model shape (compare {model_description(ckpt)} with your "
            "model section); load an earlier checkpoint or fix the model section"
        ) from exc
    mcore_io.check_absent_keys(absent, ckpt)
    try:
        mcore_io.load_model_state_dict(_unwrap(model[0]), loaded["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match the model: {str(exc)[:400]}; check the model section"
        ) from exc
    if not weights_only and optimizer is not None:
        # The distributed optimizer copies into its main parameters in place (fp32: views of the
        # model's leaf parameters), which autograd refuses outside no_grad.
        with torch.no_grad(), _keep_adam_steps_in_state_copies(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if include_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    if weights_only:
        return {"step": 0, "loaded_from": str(ckpt), "source_step": int(info.get("step", 0))}
    return {**info, "loaded_from": str(ckpt)}
