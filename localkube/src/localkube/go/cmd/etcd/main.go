// Command etcd is a thin wrapper around go.etcd.io/etcd/server/v3/etcdmain so
// the etcd server can be built from the Go module proxy (no prebuilt binary).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
