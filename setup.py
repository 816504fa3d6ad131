"""Build hooks: the optional C++ data extension (csrc/) and the example configs shipped inside the
package. Metadata lives in pyproject.toml.

The extension is optional: when it cannot be compiled the package installs without it and
the pure-Python fallback in nbdiff_megatron.data is used; NBDIFF_BUILD_EXT=0 skips it.

examples/*.yaml are copied into the built package as nbdiff_megatron/assets/examples/ (package data):
`nbdiff demo` and `nbdiff ablate` read examples/tiny_cpu.yaml, which an installed wheel must hold
(nbdiff_megatron.data.bundled.example_config finds it there, or in a source checkout's examples/).
"""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

PACKAGED_EXAMPLES = os.path.join("nbdiff_megatron", "assets", "examples")


class BuildPyWithExamples(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PACKAGED_EXAMPLES)
        os.makedirs(target, exist_ok=True)
        for config in sorted(glob.glob(os.path.join("examples", "*.yaml"))):
            shutil.copyfile(config, os.path.join(target, os.path.basename(config)))


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
    if os.environ.get("NBDIFF_BUILD_EXT", "1") == "0":
        return []
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


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithExamples},
)
