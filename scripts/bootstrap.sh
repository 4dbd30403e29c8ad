#!/usr/bin/env bash
# Prepare this checkout on a Debian/Ubuntu machine: the system packages that
# are missing (libzmq3-dev, pkg-config, C compilers, venv; mount for
# scripts/wheel.sh's namespace; redis-server, iproute2 and openssl for the tests' own
# Redis (with TLS) and network namespaces), a virtualenv in
# .venv and an in-place build of the Cython core with the test extras.
# Safe to run again: it rebuilds only when a source or build file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${NZF_EXTRAS:-test}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in libzmq3-dev pkg-config gcc clang mount redis-server iproute2 openssl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
"$PYTHON" -c "import sysconfig, os; exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
    || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    as_root apt-get update -q
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "${missing[@]}"
fi
# The fuzzers (tests/fuzz) build the core with clang's ASan and libFuzzer,
# which Debian 12 ships apart from clang, in libclang-rt-<version>-dev.
if ! [[ "$(clang -print-file-name="libclang_rt.fuzzer_no_main-$(uname -m).a")" = /* ]]; then
    rt="libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev"
    echo "bootstrap: installing $rt" >&2
    as_root apt-get update -q
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "$rt"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# The build is stamped with its sources, and the extras installed so far
# are kept: test.sh and bench.sh, which want different extras, share it.
stamp=.venv/.nzf-build
extras_file=.venv/.nzf-extras
want=$( (cat setup.py pyproject.toml nova_zmq_fast/__init__.py csrc/*.h nova_zmq_fast/*.pyx nova_zmq_fast/*.pxd) \
        | sha256sum | cut -d' ' -f1)
have_extras=$(cat "$extras_file" 2>/dev/null || true)
all_extras=$(echo "$have_extras,$EXTRAS" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ "$all_extras" != "$have_extras" ] || \
        ! .venv/bin/python -c "import nova_zmq_fast._server" 2>/dev/null; then
    echo "bootstrap: building nova_zmq_fast (about a minute)" >&2
    # The build requirements too, for setup.py build_ext --inplace (README).
    .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" "Cython>=3.0.10,<4"
    .venv/bin/python -m pip install -q -e ".[$all_extras]"
    echo "$want" > "$stamp"
    echo "$all_extras" > "$extras_file"
fi
