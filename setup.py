"""Build hook for the optional C++ data extension (csrc/). Metadata lives in pyproject.toml.

The extension is optional: when it cannot be compiled the package installs without it and
the pure-Python fallback in nbdiff_megatron.data is used.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the fallback"
            print(f"warning: C++ extension not built ({exc}); using the Python fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: C++ extension {ext.name} not built ({exc}); using the Python fallback")


def _extensions():
    import os

    sources = (
        sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
        if os.path.isdir("csrc")
        else []
    )
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [
        Pybind11Extension(
            "nbdiff_megatron._nbdiff_cpp", sources, cxx_std=17, extra_compile_args=["-O3"]
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
