#!/usr/bin/env bash
# Build our Go peers (estargz-peer, go-stargz-store) against the Go packages Debian installs
# under /usr/share/gocode (golang-github-containerd-stargz-snapshotter-dev and its
# dependencies), with no network: GOPATH mode (GO111MODULE=off) resolves every import from
# that tree, so no module download, go.sum or vendor directory is involved.
#
#   peers/go/build.sh [OUTDIR]     (default: .peers/bin at the top of the checkout)
#
# Rebuilds only when a source file, the Go toolchain or the library package changed (a stamp
# next to the binaries). Exit status 3 when the toolchain or library is not installed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/../../.peers/bin}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
GOCODE=${GOPEER_GOCODE:-/usr/share/gocode}
LIB=$GOCODE/src/github.com/containerd/stargz-snapshotter
PEERS=(estargz-peer go-stargz-store)

if ! command -v go >/dev/null 2>&1; then
    echo "peers/go/build.sh: no Go toolchain (Debian: apt-get install golang-go)" >&2
    exit 3
fi
if [ ! -d "$LIB/store" ] || [ ! -d "$LIB/estargz" ]; then
    echo "peers/go/build.sh: $LIB is missing (Debian: apt-get install" \
        "golang-github-containerd-stargz-snapshotter-dev)" >&2
    exit 3
fi

libversion=$(dpkg-query -W -f='${Version}' golang-github-containerd-stargz-snapshotter-dev \
    2>/dev/null || cat "$LIB/go.mod")
stamp=$( (go version; echo "$libversion"; cd "$HERE" && cat build.sh ./*/*.go) | sha256sum | cut -c1-32)
complete=1
for p in "${PEERS[@]}"; do [ -x "$OUT/$p" ] || complete=0; done
if [ "$complete" = 1 ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

export GO111MODULE=off GOPATH=$GOCODE GOFLAGS= GOPROXY=off GONOSUMDB= GOWORK=off
# A build cache speeds up rebuilds; Go's default needs $HOME or $XDG_CACHE_HOME.
if [ -z "$(go env GOCACHE 2>/dev/null)" ] || [ "$(go env GOCACHE)" = off ]; then
    export GOCACHE=$OUT/../go-cache
fi
echo "peers/go/build.sh: building ${PEERS[*]} (Go $(go env GOVERSION), library $libversion)" >&2
t0=$SECONDS
for p in "${PEERS[@]}"; do
    (cd "$HERE/$p" && go build -trimpath -o "$OUT/$p.tmp" .)
    mv -f "$OUT/$p.tmp" "$OUT/$p"
done
echo "$stamp" >"$OUT/.stamp"
echo "peers/go/build.sh: done in $((SECONDS - t0)) s -> $OUT" >&2
