"""nbdiff-megatron: adapt autoregressive LLMs into block-diffusion LLMs (NBDiff) on megatron-core."""

__version__ = "0.1.0"

from nbdiff_megatron.megatron_compat import defer_megatron_compile

# Before any of our modules imports megatron-core: its fused functions then compile on first use
# rather than importing TorchDynamo at start-up (~3 s per CPU process; megatron_compat.py).
defer_megatron_compile()
