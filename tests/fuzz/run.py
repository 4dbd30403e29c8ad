"""Build the coverage-instrumented core and run the fuzz harnesses.

    python -m tests.fuzz.run [--seconds N] [harness ...]

The instrumented core is a separate build: the package's sources are copied
to build/fuzz/src and built there with clang, libFuzzer's coverage
instrumentation (-fsanitize=fuzzer-no-link) and AddressSanitizer, without
touching the in-place build or setup.py.  It is rebuilt only when a source
changed.  Each harness (tests/fuzz/fuzz_*.py) then runs under atheris in a
process of its own, with that copy first on PYTHONPATH, the ASan runtime
preloaded and Python allocating through malloc so ASan sees every object.

Seeds are committed in tests/fuzz/corpus/<harness>/seeds; what the fuzzer
finds goes to tests/fuzz/corpus/<harness>/generated (not committed) and
crashing inputs to build/fuzz/crashes.  The time is split evenly between
the harnesses; the exit status is non-zero if any harness failed.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build", "fuzz")
SRC = os.path.join(BUILD, "src")
HARNESSES = ["header", "body", "server"]
# Server inputs may exceed its 4 KiB message limit, to reach the oversize
# path; body inputs stay short, since the limit comes from the input.
OPTIONS = {"header": [], "body": ["-max_len=2048"], "server": ["-max_len=12000"]}
SOURCES = ["setup.py", "pyproject.toml", "README.md", "csrc", "nova_zmq_fast"]
RUNTIME = os.path.join(BUILD, "asan_with_fuzzer.so")


def _sources():
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            yield path
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in sorted(files):
                if f.endswith((".py", ".pyx", ".pxd", ".h")):
                    yield os.path.join(folder, f)


def build():
    """Build the instrumented copy unless it is up to date; its path."""
    digest = hashlib.sha256()
    for path in sorted(_sources()):
        digest.update(path.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    stamp = os.path.join(BUILD, "stamp")
    want = digest.hexdigest()
    if os.path.exists(stamp) and open(stamp).read() == want:
        return SRC
    print("fuzz: building the instrumented core (about a minute)", file=sys.stderr, flush=True)
    shutil.rmtree(SRC, ignore_errors=True)
    for path in _sources():
        target = os.path.join(SRC, os.path.relpath(path, ROOT))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(path, target)
    flags = "-fsanitize=address,fuzzer-no-link -fno-omit-frame-pointer -g"
    # CFLAGS reach the link too; a shared object gets no sanitizer runtime
    # of its own: the preloaded one (below) serves every module.
    env = dict(os.environ, CC="clang", LDSHARED="clang -shared", CFLAGS=flags, LDFLAGS="")
    with open(os.path.join(BUILD, "build.log"), "wb") as log:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=SRC, env=env, check=True, stdout=log, stderr=log)
    build_runtime()
    with open(stamp, "w") as f:
        f.write(want)
    return SRC


def build_runtime():
    """ASan and libFuzzer in one shared object, preloaded into Python.

    The sanitizer runtime must be loaded before anything else, and the
    coverage counters of the instrumented modules must reach the libFuzzer
    that drives the run: with ASan alone preloaded, its stub coverage hooks
    would win and the fuzzer would run blind.  atheris sees the preloaded
    libFuzzer and uses it.  ASan's preinit object cannot go in a shared
    object; preloading does its job."""
    arch = platform.machine()
    lib = subprocess.run(["clang", f"-print-file-name=libclang_rt.asan-{arch}.a"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(lib):
        raise RuntimeError("clang's sanitizer runtimes are missing (Debian: libclang-rt-14-dev)")
    folder = os.path.dirname(lib)
    asan = os.path.join(BUILD, "asan.a")
    shutil.copy(lib, asan)
    subprocess.run(["ar", "d", asan, "asan_preinit.cpp.o"], check=True)
    subprocess.run(["clang++", "-shared", "-o", RUNTIME, "-Wl,--whole-archive", asan,
                    os.path.join(folder, f"libclang_rt.asan_cxx-{arch}.a"),
                    os.path.join(folder, f"libclang_rt.fuzzer_no_main-{arch}.a"),
                    "-Wl,--no-whole-archive", "-ldl", "-lpthread", "-lrt", "-lm"], check=True)
    os.unlink(asan)


def run(harness, seconds, src, extra=()):
    """Fuzz one harness for `seconds`; (ok, inputs executed, log tail)."""
    corpus = os.path.join(HERE, "corpus", harness)
    generated = os.path.join(corpus, "generated")
    crashes = os.path.join(BUILD, "crashes", harness)
    os.makedirs(generated, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, ROOT]),
               LD_PRELOAD=RUNTIME, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:"
                            "handle_segv=1:abort_on_error=0")
    argv = [sys.executable, os.path.join(HERE, f"fuzz_{harness}.py"),
            f"-max_total_time={seconds}", "-print_final_stats=1", "-rss_limit_mb=4096",
            "-timeout=30", f"-artifact_prefix={crashes}/", *OPTIONS[harness], *extra,
            generated, os.path.join(corpus, "seeds")]
    log = os.path.join(BUILD, f"{harness}.log")
    with open(log, "wb") as out:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=seconds + 300)
    text = open(log, errors="replace").read()
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    return proc.returncode == 0, int(executed.group(1)) if executed else 0, text[-3000:]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60, help="in total, over all harnesses")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("harnesses", nargs="*", default=HARNESSES)
    args = parser.parse_args()
    src = build()
    each = max(1, args.seconds // len(args.harnesses))
    results, failed = {}, False
    for harness in args.harnesses:
        start = time.monotonic()
        ok, executed, tail = run(harness, each, src)
        results[harness] = {"ok": ok, "executed": executed,
                            "seconds": round(time.monotonic() - start, 1)}
        failed |= not ok
        if not args.json:
            print(f"fuzz {harness}: {'ok' if ok else 'FAILED'}, {executed} inputs in "
                  f"{results[harness]['seconds']} s", flush=True)
            if not ok:
                print(tail, flush=True)
    if args.json:
        print(json.dumps(results))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
