// casd-gogzip: gzip as Go's image tools write it, so casd can make their layers again.
//
// umoci, skopeo, podman and buildah compress layers with klauspost/pgzip. Its output is
// a function of the input, the level and the block size (each block is deflated on its
// own, with the previous block's last 16 KiB as dictionary), not of the concurrency.
// Built from the same library sources as the tool that made a layer, this program makes
// the layer's bytes again from its tar. casd checks every byte against the digest; it
// never trusts this program's output unchecked (casd/oci/gogzip.py).
//
// Reads the tar on stdin, writes the gzip stream to stdout. The gzip header it writes is
// pgzip's default (10 bytes, no name, mtime 0); casd puts the layer's own header in its
// place.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/klauspost/pgzip"
)

// Set at build time (-ldflags -X main.libs=...): the library versions built in.
var libs = "unknown"

func fail(code int, err error) {
	fmt.Fprintln(os.Stderr, "casd-gogzip:", err)
	os.Exit(code)
}

func main() {
	level := flag.Int("level", -1, "compression level: -1 (the library's default) or 0-9")
	block := flag.Int("block", 1<<20, "pgzip block size in bytes (umoci: 262144)")
	showVersion := flag.Bool("version", false, "print the library versions built in, then exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(libs)
		return
	}
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	z, err := pgzip.NewWriterLevel(out, *level)
	if err != nil {
		fail(2, err)
	}
	if err := z.SetConcurrency(*block, runtime.GOMAXPROCS(0)); err != nil {
		fail(2, err)
	}
	if _, err := io.Copy(z, bufio.NewReaderSize(os.Stdin, 1<<20)); err != nil {
		fail(1, err)
	}
	if err := z.Close(); err != nil {
		fail(1, err)
	}
	if err := out.Flush(); err != nil {
		fail(1, err)
	}
}
