"""What a checkpoint of a config weighs and what a save costs in training time (`nbdiff plan`'s lines).

Sizes from the model's shapes (`parameter_counts`, which plan.py's memory and FLOPs use too): the weights
in the training precision (bf16: 2 bytes, fp32: 4), the optimizer state as megatron-core writes it (the
distributed optimizer or bf16 training: fp32 main weights + two Adam moments = 12 bytes per parameter;
the plain fp32 optimizer: the two moments = 8). The save time is the checkpoint over an aggregate
file-system write bandwidth that the lines state (`FS_WRITE_GBPS`); a synchronous save stops training for
all of it, an asynchronous one (checkpoint.async_save, docs/checkpoints.md) only for the copy of each
rank's shard to host memory (`HOST_COPY_GBPS`, on GPU) before the write goes on in the background.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdiff_megatron.training.config import TrainConfig

FS_WRITE_GBPS = 10.0
"""Assumed aggregate write bandwidth of the cluster file system (GB/s), e.g. a Lustre / GPFS share."""
HOST_COPY_GBPS = 20.0
"""Assumed device-to-host copy bandwidth of one GPU (GB/s, PCIe Gen4/5 with pinned memory)."""


@dataclass(frozen=True)
class CheckpointCost:
    weights_bytes: float
    optimizer_bytes: float
    ranks: int

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.optimizer_bytes

    def sync_seconds(self, fs_gbps: float = FS_WRITE_GBPS) -> float:
        """Training time of a synchronous save: the whole checkpoint through the file system."""
        return self.total_bytes / (fs_gbps * 1e9)

    def async_seconds(self, host_gbps: float = HOST_COPY_GBPS) -> float:
        """Training time of an asynchronous save: one rank's share copied to host memory."""
        return self.total_bytes / self.ranks / (host_gbps * 1e9)


def parameter_counts(cfg: TrainConfig, tp: int = 1) -> tuple[int, int]:
    """(parameters of one transformer layer, of the embedding table) before TP splitting."""
    m = cfg.model
    d, nq, nkv = m.head_dim, m.num_attention_heads, m.query_groups
    layer = (
        m.hidden_size * (nq + 2 * nkv) * d
        + nq * d * m.hidden_size
        + 3 * m.hidden_size * m.ffn_hidden_size
        + 2 * m.hidden_size
        + (2 * d if m.qk_layernorm else 0)
        + ((nq + 2 * nkv) * d if m.add_qkv_bias else 0)
    )
    return layer, m.padded_vocab_size(tp) * m.hidden_size


def checkpoint_cost(cfg: TrainConfig) -> CheckpointCost:
    """Bytes of one checkpoint of `cfg` (weights, optimizer state) and the ranks that write it."""
    m = cfg.model
    layer, embedding = parameter_counts(cfg)
    params = m.num_layers * layer + embedding * (1 if m.tie_embeddings else 2) + m.hidden_size
    bf16 = cfg.train.precision in ("bf16", "auto")
    weights = params * (2 if bf16 else 4)
    per_param = 12 if (bf16 or cfg.parallel.distributed_optimizer) else 8
    par = cfg.parallel
    ranks = par.tp * par.pp * par.cp * (par.dp or 1)
    return CheckpointCost(float(weights), float(params * per_param), ranks)


def checkpoint_lines(cfg: TrainConfig) -> list[str]:
    """`nbdiff plan`'s checkpoint lines: size, and the training time a save costs, sync vs async."""
    cost = checkpoint_cost(cfg)
    every = cfg.checkpoint.save_interval
    return [
        f"checkpoint: {cost.total_bytes / 1e9:,.1f} GB (weights {cost.weights_bytes / 1e9:,.1f}, "
        f"optimizer {cost.optimizer_bytes / 1e9:,.1f}) every {every} steps",
        f"  training time per save at {FS_WRITE_GBPS:g} GB/s file-system writes: sync "
        f"{cost.sync_seconds():,.1f} s; async (checkpoint.async_save) "
        f"{cost.async_seconds():,.2f} s (host copy of each rank's share at {HOST_COPY_GBPS:g} "
        "GB/s, the write overlaps training)",
    ]
