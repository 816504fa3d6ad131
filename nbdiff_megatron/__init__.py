"""nbdiff-megatron: adapt autoregressive LLMs into block-diffusion LLMs (NBDiff) on megatron-core.

Importing the package (or any of its modules) changes nothing outside it. The process-wide compatibility
patches are installed by `install_compat()`. The `nbdiff` command and the test set-up call it, and a
library user calls it once, before importing megatron-core (docs/ARCHITECTURE.md, "Compatibility patches").
"""

from nbdiff_megatron.megatron_compat import defer_megatron_compile, quiet_megatron

__version__ = "0.1.0"


def install_compat(*, cpu_patches: bool = True) -> None:
    """Install the process-wide compatibility patches; idempotent.

    - megatron-core's import-time `torch.compile` wrappers are built on first call instead, in a
      process without CUDA (start-up time: ~3 s per CPU process; docs/megatron-compat.md). This acts on
      megatron modules imported after the call.
    - megatron-core's optional-dependency warnings and its planned deprecation notices are dropped
      (shown again with NBDIFF_SHOW_DEPRECATIONS=1).
    - `cpu_patches`: megatron-core's CUDA assumptions are patched when CUDA is absent
      (model/cpu_compat.py; it imports megatron-core). The model builder also applies them when it
      builds a model on a CPU, so the `nbdiff` command passes False: commands that never build a model
      then do not import megatron-core at start-up.
    """
    defer_megatron_compile()
    quiet_megatron()
    if cpu_patches:
        # Imported here: cpu_compat imports torch and megatron-core, seconds that `import
        # nbdiff_megatron` does not pay (and the deferral above must be in place before it).
        from nbdiff_megatron.model import cpu_compat

        cpu_compat.apply()
