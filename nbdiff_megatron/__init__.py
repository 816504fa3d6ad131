"""nbdiff-megatron: adapt autoregressive LLMs into block-diffusion LLMs (NBDiff) on megatron-core.

Importing the package (or any of its modules) changes nothing outside it. The process-wide compatibility
patches are installed by `install_compat()` (megatron_compat.py, their one home). The `nbdiff` command and
the test set-up call it, and a library user calls it once, before importing megatron-core
(docs/ARCHITECTURE.md, "Compatibility patches").
"""

from nbdiff_megatron.megatron_compat import install_compat

__all__ = ["install_compat"]
__version__ = "0.1.0"
