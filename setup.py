"""Build the Cython core against the system libzmq.

Extra ``build_ext`` switches, in the spirit of uvloop's setup.py:

    --cython-always      re-run Cython even when the generated C is newer
    --cython-annotate    write the annotated HTML next to each .pyx
    --cython-directives  extra directives, e.g. "boundscheck=True"
    --zmq-debug          build with assertions and no optimisation

libzmq's flags come from pkg-config (Debian: ``apt install libzmq3-dev``).
"""
import os
import shlex
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ["_zmq", "_envelope", "_client", "_server"]


def pkg_config(*args):
    try:
        out = subprocess.check_output(["pkg-config", *args, "libzmq"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def zmq_flags():
    cflags = pkg_config("--cflags")
    libs = pkg_config("--libs")
    if cflags is None or libs is None:
        # No pkg-config: assume the headers and library are on default paths.
        return [], ["-lzmq"]
    return cflags, libs


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-always", None, "run Cython even if the C files look fresh"),
        ("cython-annotate", None, "produce annotated HTML for each module"),
        ("cython-directives=", None, "extra Cython compiler directives"),
        ("zmq-debug", None, "build with assertions and -O0"),
    ]
    boolean_options = _build_ext.boolean_options + [
        "cython-always", "cython-annotate", "zmq-debug"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_always = False
        self.cython_annotate = False
        self.cython_directives = None
        self.zmq_debug = False

    def finalize_options(self):
        from Cython.Build import cythonize

        directives = {
            "language_level": 3,
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        }
        if self.cython_directives:
            for item in self.cython_directives.split(","):
                key, _, value = item.partition("=")
                directives[key.strip()] = {"True": True, "False": False}.get(
                    value.strip(), value.strip())
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=self.cython_annotate,
            force=self.cython_always,
            include_path=[os.path.join(HERE, "nova_zmq_fast")],
        )
        if self.zmq_debug:
            for ext in self.distribution.ext_modules:
                ext.extra_compile_args += ["-O0", "-g", "-UNDEBUG"]
        super().finalize_options()


def extensions():
    cflags, libs = zmq_flags()
    return [
        Extension(
            f"nova_zmq_fast.{name}",
            [f"nova_zmq_fast/{name}.pyx"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=cflags + ["-O2"],
            extra_link_args=libs + ["-pthread"],
        )
        for name in MODULES
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
