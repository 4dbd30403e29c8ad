#!/usr/bin/env bash
# cibuildwheel's before-all on Linux (pyproject.toml [tool.cibuildwheel]):
# build the pinned libzmq, with CURVE, into $NZF_LIBZMQ_PREFIX, once per
# manylinux container.  setup.py then links the extensions to it and
# auditwheel copies it into each wheel.
#
# CURVE uses libsodium, linked statically into libzmq, rather than libzmq's
# built-in tweetnacl: libsodium is audited, maintained and fast (CURVE
# encrypts every message, and tweetnacl is a compact reference
# implementation), and it is what pyzmq, conda-forge and Debian ship.
# Static, so the wheel carries one library, not two.
#
# Both come from their release tarballs, checked against the sha256 pinned
# here; the licences of both are left in $NZF_LIBZMQ_PREFIX/licenses, where
# setup.py picks them up for the wheel.  Needs network access to GitHub.
set -euo pipefail

LIBZMQ_VERSION=4.3.5
LIBZMQ_SHA256=6653ef5910f17954861fe72332e68b03ca6e4d9c7160eb3a8de5a5a913bfab43
LIBSODIUM_VERSION=1.0.20
LIBSODIUM_SHA256=ebb65ef6ca439333c2bb41a0c1990587288da07f6c7fd07cb3a18cc18d30ce19

prefix=${NZF_LIBZMQ_PREFIX:?set NZF_LIBZMQ_PREFIX to the directory to install into}
jobs=$(nproc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

fetch() {               # url sha256 dir: download, verify, unpack into dir
    curl -fsSL --retry 3 -o tarball "$1"
    echo "$2  tarball" | sha256sum -c - >/dev/null || {
        echo "build-libzmq.sh: $1 does not match its pinned sha256" >&2
        exit 1
    }
    mkdir "$3"
    tar -xzf tarball -C "$3" --strip-components=1
    rm tarball
}

fetch "https://github.com/jedisct1/libsodium/releases/download/$LIBSODIUM_VERSION-RELEASE/libsodium-$LIBSODIUM_VERSION.tar.gz" \
    "$LIBSODIUM_SHA256" sodium
fetch "https://github.com/zeromq/libzmq/releases/download/v$LIBZMQ_VERSION/zeromq-$LIBZMQ_VERSION.tar.gz" \
    "$LIBZMQ_SHA256" zeromq

(cd sodium &&
    ./configure --prefix="$prefix" --libdir="$prefix/lib" \
        --disable-shared --enable-static --with-pic &&
    make -j"$jobs" && make install)

# libzmq's own randombytes_close() would close libsodium's random source
# under other users of it in the process: off, as pyzmq and conda-forge do.
(cd zeromq &&
    PKG_CONFIG_PATH="$prefix/lib/pkgconfig" ./configure --prefix="$prefix" --libdir="$prefix/lib" \
        --enable-curve --with-libsodium --disable-libsodium_randombytes_close \
        --disable-static --disable-drafts --disable-perf --disable-curve-keygen \
        --disable-Werror --without-docs &&
    make -j"$jobs" && make install)

mkdir -p "$prefix/licenses"
cp zeromq/LICENSE "$prefix/licenses/libzmq-LICENSE.txt"
cp sodium/LICENSE "$prefix/licenses/libsodium-LICENSE.txt"
echo "build-libzmq.sh: libzmq $LIBZMQ_VERSION with libsodium $LIBSODIUM_VERSION in $prefix" >&2
