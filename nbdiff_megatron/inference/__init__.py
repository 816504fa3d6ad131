"""Inference: block-diffusion decoding with a KV cache (`BlockDecoder`), the AR baseline (`ARDecoder`),
`nbdiff generate` (cli.py) and `nbdiff eval` (lm_eval_adapter.py).

    from nbdiff_megatron.inference import BlockDecoder
    decoder = BlockDecoder(model, mask_id=tok.mask_id, eos_ids=[tok.eod], block_size=32,
                           sub_block_size=8)
    out = decoder.generate([tok.encode("Question: ...")], max_new_tokens=128)
    out.tokens[0], out.stats.tokens_per_forward, out.stats.forward_passes

Heavy imports (megatron-core) happen when a decoder is built, not at package import.
"""

from nbdiff_megatron.inference.ar import ARDecoder
from nbdiff_megatron.inference.decoder import (
    BlockDecoder,
    DecodeConfig,
    DecodeOutput,
    DecodeSession,
    DecodeStats,
)
from nbdiff_megatron.inference.unmasking import UNMASKING_RULES, SamplingConfig, UnmaskingConfig

__all__ = [
    "ARDecoder",
    "BlockDecoder",
    "DecodeConfig",
    "DecodeOutput",
    "DecodeSession",
    "DecodeStats",
    "SamplingConfig",
    "UNMASKING_RULES",
    "UnmaskingConfig",
]
