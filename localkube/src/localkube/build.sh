#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl and etcd
# from the Go module in localkube/src/localkube/go, and CoreDNS from localkube/src/localkube/coredns, into a per-machine cache outside the repository:
#
#   ${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}/k8s/<hash>/bin/
#
# <hash> covers go.mod, go.sum, every .go file of the module, the build flags
# and the Go version, so the (long) cold build runs once per machine and is
# reused until the pin changes. Prints the bin dir on stdout (and nothing else); progress goes to
# stderr. A second run is instant.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod="$here/go"
dns="$here/coredns"
cache_root="${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}/k8s"
bins=(etcd kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy coredns)

command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build.sh: go is not on PATH" >&2; exit 1; }

kver="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$mod/go.mod")"   # e.g. v1.34.3
major="${kver#v}"; major="${major%%.*}"
minor="${kver#v*.}"; minor="${minor%%.*}"
ld="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
flags="CGO_ENABLED=0 -trimpath -ldflags=$ld"

hash="$( { cd "$mod"; cat go.mod go.sum; find . -name '*.go' -type f | LC_ALL=C sort | xargs cat
           cd "$dns"; cat go.mod go.sum main.go; echo "$flags"; go version; } | sha256sum | cut -c1-16)"
out="$cache_root/$hash"
bin="$out/bin"


complete() {
  [ -f "$bin/.complete" ] || return 1
  for b in "${bins[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

if complete; then echo "$bin"; exit 0; fi

mkdir -p "$out"
exec 9>"$out/.lock"
echo "build.sh: taking the build lock $out/.lock" >&2
flock 9
if complete; then echo "$bin"; exit 0; fi   # built by a concurrent run

ld="$ld -X k8s.io/component-base/version.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"

tmp="$out/bin.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build.sh: building Kubernetes $kver control plane into $bin (cold build: about 12 min on 2 cores)" >&2
start=$(date +%s)
(
  cd "$mod"
  export CGO_ENABLED=0
  go build -trimpath -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
  go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" ./cmd/etcd
  cd "$dns" && go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .
) >&2
for b in "${bins[@]}"; do [ -x "$tmp/$b" ] || { echo "build.sh: $b missing after build" >&2; exit 1; }; done
touch "$tmp/.complete"
rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
echo "build.sh: built in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
