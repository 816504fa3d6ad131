"""nbdiff-megatron: adapt autoregressive LLMs into block-diffusion LLMs (NBDiff) on megatron-core."""

__version__ = "0.1.0"
