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
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.distributed.data_parallel_base import _BaseDataParallel

from nbdiff_megatron.checkpoint import mcore_io
from nbdiff_megatron.checkpoint.dist import (
    CHECKPOINT_PREFIX,
    COMPLETE_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    TMP_PREFIX,
    AsyncWriter,
    barrier,
    checkpoint_name,
    damaged_shard_files,
    device_mode,
    find_checkpoint,
    list_checkpoints,
    load_strategy,
    model_description,
    process_rank,
    read_checkpoint_info,
    read_common_state,
    short_error,
    truncated_message,
    write_dist_checkpoint,
)
from nbdiff_megatron.errors import CheckpointError, checkpoint_read_errors
from nbdiff_megatron.training import faults
from nbdiff_megatron.training.run_identity import check_resume

try:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys
except ImportError:  # a megatron-core without it pairs saved and current param groups by position
    param_group_identifier_keys = None

ANOMALOUS_DIR = "anomalous"
CORRUPT_DIR = "corrupt"
"""Where a start moves damaged checkpoints of its own run (never deleted), before loading an older one."""
SUPERSEDED_DIR = "superseded"
"""Where `--checkpoint.load=<save>/iter_N` moves the run's newer checkpoints (kept, not deleted)."""
REWOUND_FILE = "rewound.json"
"""Records the last explicit `--checkpoint.load=<save>/iter_N` of a run: a requeue of that command
continues from the newer checkpoints it wrote since, instead of going back again."""


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
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointError(
                f"{damage}. It is the newest checkpoint of checkpoint.save={save}; move it aside "
                "to resume from the one before it"
            )
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


# ------------------------------------------------------------------- the save dir before a start


def checkpoint_damage(path: str | Path) -> str | None:
    """Why the checkpoint `path` cannot be resumed from (a shard shorter than its index, an unreadable
    common state), or None. The same check as `nbdiff generate` and `nbdiff convert` make on read."""
    damaged = damaged_shard_files(Path(path))
    if damaged:
        return truncated_message(damaged)
    try:
        read_common_state(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _move_aside(path: Path, folder: str) -> Path:
    target = path.parent / folder / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
        n += 1
        target = path.parent / folder / f"{path.name}.{n}"
    os.replace(path, target)
    return target


def _point_latest_at_newest(save: Path) -> None:
    own = list_checkpoints(save)
    if own:
        _write_latest(save, own[-1][0])
    else:
        (save / LATEST_FILE).unlink(missing_ok=True)


def remove_stale_saves(save: Path) -> list[str]:
    """Delete `.tmp_iter_*` folders left by saves that were killed (rank 0, under the run lock)."""
    notes = []
    for child in sorted(save.glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*")):
        shutil.rmtree(child, ignore_errors=True)
        notes.append(f"removed {child} (an unfinished save of an earlier start)")
    return notes


def _own_checkpoint_step(save: Path, load: str | None) -> int | None:
    """N when `load` names `<save>/iter_N`, one checkpoint of this run's own save directory."""
    if not load or not Path(load).name.startswith(CHECKPOINT_PREFIX):
        return None
    if not _same_dir(Path(load).parent, save):
        return None
    try:
        return int(Path(load).name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return None


def go_back_to(save: Path, load: str | None) -> list[str]:
    """`--checkpoint.load=<save>/iter_N`: move this run's checkpoints newer than N to superseded/.

    Once only: rewound.json remembers N, so a requeue of the same command continues from what the
    run wrote after going back (docs/resume.md)."""
    step = _own_checkpoint_step(save, load)
    if step is None:
        return []
    find_checkpoint(load)  # missing or incomplete: the error says so
    newer = [(s, p) for s, p in list_checkpoints(save) if s > step]
    marker = save / REWOUND_FILE
    try:
        done = json.loads(marker.read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):
        done = False
    if not newer:
        return []
    if done:
        return [
            f"checkpoint.load={load} was selected by an earlier start ({marker}); continuing from "
            f"the checkpoints written since (remove {marker} to go back to step {step} again)"
        ]
    moved = [_move_aside(p, SUPERSEDED_DIR) for _, p in newer]
    _point_latest_at_newest(save)
    marker.write_text(json.dumps({"step": step, "set_aside": [str(p) for p in moved]}) + "\n")
    return [
        f"going back to {load} as checkpoint.load asks: the {len(moved)} newer checkpoint(s) "
        f"were moved to {save / SUPERSEDED_DIR} (kept, not deleted): "
        + ", ".join(p.name for p in moved)
    ]


def fall_back_from_damage(save: Path) -> list[str]:
    """Move damaged newest checkpoints of the run to corrupt/ while an older intact one exists.

    Raises CheckpointError when no intact checkpoint is left to fall back to (nothing is moved)."""
    own = list_checkpoints(save)
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(own):
        reason = checkpoint_damage(path)
        if reason is None:
            break
        damaged.append((path, reason))
    if not damaged:
        return []
    if len(damaged) == len(own):
        raise CheckpointError(
            f"every checkpoint of {save} is damaged ({damaged[0][1]}); copy them again, or start "
            "the run afresh in a new save directory (--checkpoint.save=<new dir>)"
        )
    notes = []
    for path, reason in damaged:
        target = _move_aside(path, CORRUPT_DIR)
        notes.append(f"WARNING: {reason}. Moved it to {target} (not deleted); falling back")
    _point_latest_at_newest(save)
    notes.append(f"resuming from the newest intact checkpoint, {list_checkpoints(save)[-1][1]}")
    return notes


def prepare_save_dir(save: str | Path | None, load: str | None) -> list[str]:
    """What a start does to its own save directory before planning (rank 0, holding the run lock):
    stale `.tmp_iter_*` removed, an explicit older checkpoint selected, damaged newest checkpoints
    set aside. Returns one line per thing done, for the log."""
    if not save or not Path(save).is_dir():
        return []
    save = Path(save)
    return remove_stale_saves(save) + go_back_to(save, load) + fall_back_from_damage(save)


def check_start(plan: StartPlan, identity: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Compare the checkpoint a start loads with its config (run_identity.check_resume): raise
    CheckpointError for a change of the model or the data position's meaning, else return the
    allowed changes. Converted weights (no train_state) are checked by the converter instead."""
    if plan.path is None:
        return []
    try:
        info = read_checkpoint_info(find_checkpoint(plan.path))
    except CheckpointError:
        if plan.weights_only:
            return []
        raise
    return check_resume(
        info, identity, config, checkpoint=str(plan.path), weights_only=plan.weights_only
    )


# --------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout() -> dict[str, int]:
    """This process's parallel layout (sizes and ranks), as stored with a checkpoint."""
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object(state: dict[str, Any] | None):
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
    while isinstance(chunk, _BaseDataParallel):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model) != 1:
        raise NotImplementedError(
            "virtual pipeline stages (several model chunks) are not supported"
        )
    return _unwrap(model[0]).sharded_state_dict()


OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
"""How a distributed optimizer's state can be written (`checkpoint.optimizer_sharding`, megatron-core's
`distrib_optim_sharding_type`; docs/checkpoints.md). megatron-core 0.16's own default
('fully_sharded_model_space') is deprecated and fails at save ("flattened_range is not supported")."""


def is_distributed_optimizer(optimizer: Any) -> bool:
    """True for megatron-core's DistributedOptimizer (alone or chained)."""
    return any(
        hasattr(opt, "data_parallel_group_idx")
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
    )


def _optimizer_metadata(sharding: str | None) -> dict[str, Any] | None:
    return None if sharding is None else {"distrib_optim_sharding_type": sharding}


def resume_sharding(
    ckpt: Path, info: dict[str, Any], distributed: bool, here: dict[str, int]
) -> str | None:
    """The sharding type to load a checkpoint's optimizer state with, at this layout `here`.

    Raises CheckpointError, before anything is loaded, when the state cannot be loaded here: a
    dp_reshardable state at another TP / PP / CP size, or the state of the other kind of optimizer.
    The message says which layouts it resumes at, and the ways out.
    """
    saved_dist = bool(info.get("distributed_optimizer", False))
    if saved_dist != distributed:
        kinds = {True: "the distributed optimizer", False: "the plain (replicated) optimizer"}
        raise CheckpointError(
            f"checkpoint {ckpt} holds the state of {kinds[saved_dist]} and this run uses "
            f"{kinds[distributed]}: resume with --parallel.distributed_optimizer="
            f"{str(saved_dist).lower()}, or start from its weights alone with "
            "--checkpoint.finetune=true"
        )
    if not distributed:
        return None
    sharding = info.get("optimizer_sharding", "dp_reshardable")
    saved = info.get("layout") or {}
    fixed = ("tp", "pp", "cp")
    if sharding == "dp_reshardable" and any(saved.get(k) != here[k] for k in fixed):
        at = " x ".join(f"{k} {saved.get(k)}" for k in fixed)
        now = " x ".join(f"{k} {here[k]}" for k in fixed)
        raise CheckpointError(
            f"checkpoint {ckpt} holds a dp_reshardable optimizer state written at {at}; it resumes "
            f"at that TP/PP/CP with any data-parallel size, not at {now}. Resume it at {at} (any "
            "number of nodes that gives it), or resume there once with "
            "--checkpoint.optimizer_sharding=fully_reshardable and let it save (that checkpoint "
            "resumes at any layout), or load its weights alone with --checkpoint.finetune=true "
            "(new optimizer state)"
        )
    return sharding


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


def _pair_saved_param_groups_by_position(optimizer: Any, saved: Any) -> None:
    """Give the saved param groups the current groups' settings, pairing them by position.

    megatron-core's DistributedOptimizer.load_state_dict pairs saved and current groups by their
    settings (`param_group_identifier_keys`: wd_mult, lr_mult, ... in 0.16; max_lr and min_lr too in
    0.19), so on 0.19 a resume that changes --optimizer.lr (a change the resume rule allows) finds no
    saved group: KeyError. The groups are
    built the same way on every start (same model, same grouping), so their order pairs them; the
    learning rate of every step comes from the schedule anyway (_set_lr). No-op on megatron-core
    versions without that pairing, and where the group counts differ (megatron-core then reports it).
    """
    if param_group_identifier_keys is None:  # this megatron-core pairs them by position itself
        return
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(opts) == 1:
        states = [saved]
    elif isinstance(saved, dict):
        states = [value for _, value in sorted(saved.items())]
    else:
        states = list(saved)
    for opt, state in zip(opts, states):
        inner = state.get("optimizer") if isinstance(state, dict) else None
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        current = getattr(getattr(opt, "optimizer", None), "param_groups", None)
        if not groups or current is None or len(groups) != len(current):
            continue
        for saved_group, group in zip(groups, current):
            for key in param_group_identifier_keys:
                for name in (key, f"pre_{key}"):
                    saved_group.pop(name, None)
                    if name in group:
                        saved_group[name] = group[name]


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


@contextlib.contextmanager
def _adam_step_kept_by_reshardable_load(optimizer: Any) -> Iterator[None]:
    """Let megatron-core 0.16 load a fully_reshardable state into torch's Adam.

    Its `_set_main_param_and_optimizer_states` copies every key of a parameter's optimizer state from
    the loaded tensors, but the loaded tensors leave out torch Adam's per-parameter `step` (kept in the
    param groups): KeyError. In this scope the missing `step` is the parameter's own (set from the
    groups by `load_state_dict`, then by `_restore_adam_steps`). No-op for apex / TE Adam (no `step`)
    and for a megatron-core that passes it.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def with_step(model_param: Any, tensors: dict, _opt: Any = opt, _orig: Any = original):
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            own = _opt.optimizer.state[main_param].get("step")
            if own is not None and "step" not in tensors:
                tensors = {**tensors, "step": own.clone()}
            _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def _sharded_state_dict(
    model: list[torch.nn.Module],
    optimizer: Any | None,
    *,
    rng: dict[str, Any] | None,
    include_rng: bool,
    is_loading: bool,
    sharding: str | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        if is_loading:
            _init_distributed_optimizer_state(optimizer)
        # device_mode: fully_reshardable gathers through `.cuda()` tensors.
        with device_mode():
            state["optimizer"] = optimizer.sharded_state_dict(
                state["model"], is_loading=is_loading, metadata=_optimizer_metadata(sharding)
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
    protect: set[int] | frozenset[int] | Callable[[], set[int]] = frozenset(),
    optimizer_sharding: str = "dp_reshardable",
    writer: AsyncWriter | None = None,
    on_complete: Callable[[Path], None] | None = None,
    fully_parallel: bool = False,
    drills: faults.Drills = faults.NO_DRILLS,
) -> Path:
    """Write the checkpoint of `step` under `save_dir` (all ranks call this), atomically.

    `train_state` holds the picklable non-tensor state (data position, config, ...); `step`, the
    layout and how the optimizer state is sharded are added. The checkpoint is written to
    `.tmp_iter_XXXXXXX`; once every rank's writes have finished it is renamed, `latest` is updated,
    checkpoints beyond the newest `keep_last` are deleted except the steps in `protect` (the last
    healthy checkpoint, faults.HealthyCheckpoints; a callable is asked then), and `on_complete` is
    called with the final path. With `writer` (checkpoint.async_save) that finalisation runs when
    `writer.finalize` finds the writes done; without, before this returns. `fully_parallel` spreads
    the writes of DP-replicated tensors over the DP ranks. `drills`: the run's fault drills (the kill
    in the save and in the write). Returns the final path.
    """
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if process_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a save that was killed
        tmp.mkdir()
    barrier()
    distributed = optimizer is not None and is_distributed_optimizer(optimizer)
    sharding = optimizer_sharding if distributed else None
    state = _sharded_state_dict(
        model, optimizer, rng=_rng_state(), include_rng=True, is_loading=False, sharding=sharding
    )
    state["train_state"] = {
        **train_state,
        "step": int(step),
        "layout": layout(),
        "distributed_optimizer": distributed,
        "optimizer_sharding": sharding,
        "format_version": FORMAT_VERSION,
    }

    def finalize() -> None:
        drills.during_save(step)
        barrier()
        if process_rank() == 0:
            if final.exists():
                shutil.rmtree(final)  # re-saving a step after a resume
            os.replace(tmp, final)
            _write_latest(save_dir, step)
            keep = protect() if callable(protect) else protect
            for old_step, old in list_checkpoints(save_dir)[:-keep_last]:
                if old_step not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        if on_complete is not None:
            on_complete(final)

    faults.children_die_with_this_process()
    drills.before_write(step)
    try:
        write_dist_checkpoint(
            state, tmp, finalize=finalize, writer=writer, parallel_group=_dp_group(fully_parallel)
        )
    except checkpoint_read_errors() as exc:
        raise _save_failed(save_dir, step, tmp, exc) from None
    return final


def _save_failed(save_dir: Path, step: int, tmp: Path, exc: BaseException) -> CheckpointError:
    """The error of a save that failed mid-run (disk full, file system gone read-only): the
    unfinished folder is removed, the previous checkpoint and `latest` are as they were."""
    if process_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    own = list_checkpoints(save_dir)
    kept = (
        f"the previous checkpoint {own[-1][1]} is kept and `latest` still points at it"
        if own
        else "no earlier checkpoint of this run exists"
    )
    return CheckpointError(
        f"saving the checkpoint of step {step} in {save_dir} failed ({short_error(exc)}); {kept}. "
        "Free space or fix the location, then re-run the same command to continue"
    )


def check_save_location(save: str | Path) -> None:
    """One clear CheckpointError, before training, when `save` cannot hold checkpoints: a file, a
    path under a file, a read-only or unwritable directory. Creates the directory."""
    path = Path(save)
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"checkpoint.save={save} is a file, not a directory; pass a directory path"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{TMP_PREFIX}probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.save={save} cannot be written ({exc.strerror or exc}: {exc.filename or save}); "
            "choose a writable directory (not a read-only mount, not under a file)"
        ) from None


def check_free_space(save: str | Path, num_params: int, precision: str) -> None:
    """CheckpointError when `save`'s file system has less room than one checkpoint needs: the
    weights, Adam's two moments and, in bf16, the fp32 master copy (bytes per parameter)."""
    per_param = 14 if precision == "bf16" else 12
    need = num_params * per_param
    free = shutil.disk_usage(save).free
    if free < need:
        raise CheckpointError(
            f"checkpoint.save={save} has {free / 2**30:.2f} GiB free; one checkpoint of this model "
            f"({num_params:,} parameters, {per_param} bytes each with the optimizer state) needs "
            f"about {need / 2**30:.2f} GiB. Free space or choose another --checkpoint.save"
        )


def _dp_group(fully_parallel: bool) -> Any:
    """The group a fully parallel save / load spreads its reads and writes over (data-parallel with
    context parallelism, as Megatron-LM), or None when off or there is nothing to spread."""
    if not fully_parallel or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)


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
    fully_parallel: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`), resharding to the current layout if needed.

    `path` is resolved with `find_checkpoint`. `weights_only=True` (fine-tuning the next phase) loads
    only the model weights and returns {'step': 0, ...}; otherwise the optimizer state and, if the
    layout is unchanged, the RNG states are restored too. `fully_parallel` reads each shard once
    over the DP ranks and exchanges it. Returns the checkpoint's train_state.
    Raises CheckpointError with the path and the fix when the checkpoint is missing, corrupt or does
    not match the model.
    """
    ckpt = find_checkpoint(path)
    try:
        info = read_checkpoint_info(ckpt)
    except CheckpointError:
        if not weights_only:
            raise
        info = {"step": 0}  # converted weights (nbdiff convert) carry no train_state
    here = layout()
    same_layout = info.get("layout") == here
    include_rng = (not weights_only) and same_layout
    sharding = None
    if not weights_only and optimizer is not None:
        sharding = resume_sharding(ckpt, info, is_distributed_optimizer(optimizer), here)
    state = _sharded_state_dict(
        model,
        None if weights_only else optimizer,
        rng=None,
        include_rng=include_rng,
        is_loading=True,
        sharding=sharding,
    )
    try:
        with device_mode():
            # Entries the checkpoint lacks come back as "unexpected": only `_extra_state` may be
            # (a checkpoint of the local spec loaded under Transformer Engine; mcore_io's rule).
            loaded, _, absent = dist_checkpointing.load(
                state,
                str(ckpt),
                sharded_strategy=load_strategy(ckpt, _dp_group(fully_parallel)),
                strict=StrictHandling.RETURN_UNEXPECTED,
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
        _pair_saved_param_groups_by_position(optimizer, loaded["optimizer"])
        with torch.no_grad(), _adam_step_kept_by_reshardable_load(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if include_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    if weights_only:
        return {"step": 0, "loaded_from": str(ckpt), "source_step": int(info.get("step", 0))}
    return {**info, "loaded_from": str(ckpt)}
