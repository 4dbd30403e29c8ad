"""Build the Cython core against libzmq.

Where libzmq comes from:

    NZF_LIBZMQ_PREFIX=/opt/libzmq   a prefix made by scripts/build-libzmq.sh
                                    (the wheels: cibuildwheel sets it); the
                                    extensions get an RPATH to it, so
                                    auditwheel finds the library to bundle,
                                    and the licences it left there ship in
                                    the wheel's dist-info
    otherwise                       pkg-config (Debian: ``apt install
                                    libzmq3-dev``), else the default paths

Extra ``build_ext`` switches, in the spirit of uvloop's setup.py:

    --cython-always      re-run Cython even when the generated C is newer
    --cython-annotate    write the annotated HTML next to each .pyx
    --cython-directives  extra directives, e.g. "boundscheck=True"
    --zmq-debug          build with assertions and no optimisation

The modules compile in parallel, as many at once as there are CPUs, unless
``-j N`` (``--parallel``) says otherwise.

Cython runs in ``build_ext.run()``, not earlier, so that the sdist lists the
.pyx sources and never the generated C.
"""
import os
import shlex
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ["_zmq", "_curve", "_envelope", "_routes", "_dispatch", "_client", "_courier",
           "_server"]
PREFIX = os.environ.get("NZF_LIBZMQ_PREFIX")


def pkg_config(*args):
    try:
        out = subprocess.check_output(["pkg-config", *args, "libzmq"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def zmq_flags():
    """(compile flags, link flags, runtime library dirs)."""
    if PREFIX:
        lib = os.path.join(PREFIX, "lib")
        if not os.path.exists(os.path.join(PREFIX, "include", "zmq.h")):
            raise SystemExit(f"NZF_LIBZMQ_PREFIX={PREFIX} holds no include/zmq.h")
        return [f"-I{PREFIX}/include"], [f"-L{lib}", "-lzmq"], [lib]
    cflags = pkg_config("--cflags")
    libs = pkg_config("--libs")
    if cflags is None or libs is None:
        # No pkg-config: assume the headers and library are on default paths.
        return [], ["-lzmq"], []
    return cflags, libs, []


def licence_files():
    """Our licence, plus those of the libraries in NZF_LIBZMQ_PREFIX that a
    repaired wheel bundles.  setuptools only takes licence files from inside
    the project, so they are copied under build/ first."""
    files = ["LICENSE"]
    source = os.path.join(PREFIX or "", "licenses")
    if PREFIX and os.path.isdir(source):
        target = os.path.join("build", "bundled-licenses")
        shutil.rmtree(os.path.join(HERE, target), ignore_errors=True)
        shutil.copytree(source, os.path.join(HERE, target))
        files += sorted(os.path.join(target, name) for name in os.listdir(source))
    return files


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
        # Eight independent modules: one C compiler per CPU, not one in all.
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        super().finalize_options()

    def run(self):
        from Cython.Build import cythonize

        directives = {
            "language_level": 3,
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            # No generated pickling: its __setstate__ trusts its argument.
            # Classes that travel define __reduce__ themselves.
            "auto_pickle": False,
        }
        if isinstance(self.cython_directives, str):
            extra = {}
            for item in self.cython_directives.split(","):
                key, _, value = item.partition("=")
                extra[key.strip()] = {"True": True, "False": False}.get(
                    value.strip(), value.strip())
            # Cython's own build_ext, our base when Cython is installed,
            # reads this option too and wants a dict.
            self.cython_directives = extra
        directives.update(self.cython_directives or {})
        generated = cythonize(
            self.extensions,
            compiler_directives=directives,
            annotate=self.cython_annotate,
            force=self.cython_always,
            include_path=[os.path.join(HERE, "nova_zmq_fast")],
        )
        # Keep the Extension objects: setuptools set its own state on them.
        for ext, c_ext in zip(self.extensions, generated):
            ext.sources = c_ext.sources
        if self.zmq_debug:
            for ext in self.extensions:
                ext.extra_compile_args += ["-O0", "-g", "-UNDEBUG"]
        super().run()


def extensions():
    cflags, libs, rpath = zmq_flags()
    return [
        Extension(
            f"nova_zmq_fast.{name}",
            [f"nova_zmq_fast/{name}.pyx"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=cflags + ["-O2"],
            extra_link_args=libs + ["-pthread"],
            runtime_library_dirs=rpath,
        )
        for name in MODULES
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext},
      license_files=licence_files())
