"""Process-group set-up and full <-> sharded weight mapping for megatron-core models.

Used by tests, scripts and the converter: `initialize_parallel()` starts torch.distributed (gloo on CPU,
nccl on GPU) and megatron-core's parallel_state; `shard_full_state_dict()` slices a 1-rank ("full") state
dict into the tensor/pipeline-parallel shard a rank holds, and `gather_full_tensor()` is its inverse for
one parameter (e.g. to compare gradients with a 1-rank run).

megatron-core is imported inside the functions that use it: `nbdiff convert --help` imports this module
(through checkpoint.mcore_io) and must not load megatron-core (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import gc
import os
import re
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from nbdiff_megatron.megatron_compat import apply_cpu_patches

_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int | None = None,
) -> None:
    """Start torch.distributed (from torchrun's env, or a 1-process group) and megatron parallel_state.

    `timeout_minutes` bounds every collective of the default group and of megatron's groups (None:
    torch's default, 10 minutes for NCCL). Seeds megatron's RNG tracker so that dropout and weight
    initialisation are reproducible.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state, tensor_parallel

    apply_cpu_patches()
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        **({} if timeout_minutes is None else {"distributed_timeout_minutes": timeout_minutes}),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron parallel_state and the default process group (tests call this last).

    Each gloo group runs its own threads until the last reference to it goes. A finished run's
    model, DDP and optimizer hold their groups in reference cycles (modules <-> config callbacks), so
    without a collection here they, and the threads, lived on until Python's next full collection:
    in a process that runs several trainings (ablate, the demo, the test suite), hundreds of them.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (for launching torchrun in tests)."""
    return _free_port()


# --------------------------------------------------------------------------------------- sharding
def _is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


def full_key(local_key: str, layer_offset: int) -> str:
    """Name of a pipeline stage's parameter in the full model (decoder layer indices shifted)."""
    match = _LAYER_KEY.match(local_key)
    if match is None:
        return local_key
    return f"{match.group(1)}{int(match.group(2)) + layer_offset}{match.group(3)}"


def _tp_slice(
    full: torch.Tensor, local_shape: torch.Size, dim: int, rank: int, size: int, gated: bool
) -> torch.Tensor:
    if gated:
        # SwiGLU fc1 holds [gate; up] on every rank: shard each half separately.
        halves = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(h, size, dim=dim)[rank] for h in halves], dim=dim)
    if full.shape[dim] != local_shape[dim] * size:
        # Vocab-padded tables: the sharded model may pad to a larger multiple than the full one.
        padded = full.new_zeros(
            tuple(local_shape[d] * size if d == dim else full.shape[d] for d in range(full.dim()))
        )
        count = min(full.shape[dim], padded.shape[dim])
        padded.narrow(dim, 0, count).copy_(full.narrow(dim, 0, count))
        full = padded
    return torch.chunk(full, size, dim=dim)[rank]


def layer_offset_of(model: torch.nn.Module) -> int:
    """Global index of the first decoder layer held by this pipeline stage."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers:
        return 0
    return int(layers[0].layer_number) - 1


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state-dict tensors (parameters included), skipping megatron's `_extra_state`."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(tensor, torch.Tensor):
            continue
        yield name, tensor


def shard_full_state_dict(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """The slice of a 1-rank state dict that `model` (this rank's TP/PP shard) holds.

    Handles column/row parallel linears, the gated fc1, vocab padding and pipeline layer offsets; with
    tied embeddings, a last stage without the embedding takes `output_layer.weight` from the embedding.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    offset = layer_offset_of(model)
    out: dict[str, torch.Tensor] = {}
    for name, local in named_tensors(model):
        key = full_key(name, offset)
        if key not in full and key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"{key} (stage parameter {name}) is missing from the full state dict")
        tensor = full[key]
        if getattr(local, "tensor_model_parallel", False) and tp_size > 1:
            tensor = _tp_slice(
                tensor,
                local.shape,
                local.partition_dim,
                tp_rank,
                tp_size,
                _is_gated_fc1(name, gated),
            )
        elif tensor.shape != local.shape and tensor.dim() == local.dim():
            tensor = _tp_slice(tensor, local.shape, 0, 0, 1, False)
        out[name] = tensor.to(dtype=local.dtype).clone()
    return out


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy the right slice of a 1-rank state dict into this rank's shard of the model, in place."""
    shard = shard_full_state_dict(full, model)
    with torch.no_grad():
        for name, tensor in named_tensors(model):
            tensor.copy_(shard[name])


def gather_full_tensor(
    name: str,
    local: torch.Tensor,
    param: torch.Tensor,
    *,
    gated_linear_unit: bool,
    full_rows: int | None = None,
) -> torch.Tensor:
    """All-gather a TP-sharded tensor (a parameter or its gradient) into the 1-rank layout.

    `param` carries megatron's partition attributes; `full_rows` trims vocab padding on dim 0.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        result = local
    else:
        group = parallel_state.get_tensor_model_parallel_group()
        dim = param.partition_dim
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        if _is_gated_fc1(name, gated_linear_unit):
            gates = [torch.chunk(p, 2, dim=dim)[0] for p in pieces]
            ups = [torch.chunk(p, 2, dim=dim)[1] for p in pieces]
            result = torch.cat(gates + ups, dim=dim)
        else:
            result = torch.cat(pieces, dim=dim)
    if full_rows is not None and result.shape[0] > full_rows:
        result = result[:full_rows]
    return result


def reduce_tensor_parallel_replicated_grads(model: torch.nn.Module) -> None:
    """Sum over the TP group the `.grad` of parameters that TP ranks replicate but see partially.

    Mirrors megatron-core's `finalize_model_grads` rule (QK-layernorm weights, which see only the
    rank's heads, and sequence-parallel norm weights) for models NOT wrapped in megatron's DDP (tests,
    scripts). Training with DDP gets this from `finalize_model_grads`; do not call both.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    config = getattr(model, "config", None)
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        partial = (sequence_parallel and getattr(param, "sequence_parallel", False)) or (
            qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)
        )
        if partial:
            dist.all_reduce(param.grad, group=group)


def reduce_context_parallel_grads(model: torch.nn.Module, *, average: bool = True) -> None:
    """All-reduce every `.grad` over the context-parallel group (models NOT wrapped in megatron's DDP).

    Each CP rank's backward sees only its own tokens' share of the loss, so the full gradient is the
    sum over the CP ranks. megatron-core's DDP reduces over the data-parallel group *with* context
    parallel (`get_data_parallel_group(with_context_parallel=True)`) and averages over it, while its
    pipeline schedule multiplies a `(loss, dict)` loss by the CP size to compensate; `average=True`
    mirrors that pair (use it after `get_forward_backward_func`), `average=False` sums (use it after a
    plain `loss.backward()` on the local share). Training with DDP gets this from
    `finalize_model_grads`; do not call both.
    """
    # megatron-core on first use: `nbdiff convert --help` imports this module (module doc)
    from megatron.core import parallel_state

    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return
    group = parallel_state.get_context_parallel_group()
    for param in model.parameters():
        if param.grad is None:
            continue
        dist.all_reduce(param.grad, group=group)
        if average:
            param.grad.div_(size)
