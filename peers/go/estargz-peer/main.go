// Command estargz-peer drives the Go eStargz library (containerd/stargz-snapshotter/estargz,
// as packaged by Debian) so that the Python test suite and benchmarks can cross-check our
// writer and reader against the reference implementation.
//
//	estargz-peer build [-chunk-size N] [-prioritize PATH]... [-level N] [-meta FILE] -o BLOB TAR
//	estargz-peer verify [-toc-digest DIGEST] BLOB
//
// build writes an eStargz blob with estargz.Build and prints (and optionally writes to -meta) a
// JSON object: digest, size, diffID, tocDigest, uncompressedSize (of the source tar), diffSize
// (of the blob decompressed), missedPrioritized.
//
// verify opens a blob with estargz.Open, checks the TOC digest (when given), verifies every
// chunk of every regular file against its chunkDigest through the library's verifier and prints
// the entries it sees (type, mode, size, owner, link target, xattrs, sha256 of the contents) as
// JSON. Any failure is one line on stderr and exit status 1.
package main

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "estargz-peer: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: estargz-peer build|verify [flags] ARGS")
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = build(os.Args[2:])
	case "verify":
		err = verify(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q (want build or verify)", os.Args[1])
	}
	if err != nil {
		fail("%v", err)
	}
}

type buildResult struct {
	Digest            string   `json:"digest"`
	Size              int64    `json:"size"`
	DiffID            string   `json:"diffID"`
	TOCDigest         string   `json:"tocDigest"`
	UncompressedSize  int64    `json:"uncompressedSize"` // of the source tar
	DiffSize          int64    `json:"diffSize"`         // of the blob, decompressed
	MissedPrioritized []string `json:"missedPrioritized"`
}

func build(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	chunkSize := fs.Int("chunk-size", 0, "chunk size in bytes (0: the library default)")
	level := fs.Int("level", -100, "gzip compression level (default: the library default)")
	out := fs.String("o", "", "blob to write")
	metaPath := fs.String("meta", "", "also write the JSON result to this file")
	var prioritized stringList
	fs.Var(&prioritized, "prioritize", "prioritized file (repeatable, in order)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 || *out == "" {
		return errors.New("build needs -o BLOB and one TAR argument")
	}
	src, err := os.Open(fs.Arg(0))
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	missed := []string{}
	opts := []estargz.Option{estargz.WithAllowPrioritizeNotFound(&missed)}
	if *chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunkSize))
	}
	if *level != -100 {
		opts = append(opts, estargz.WithCompressionLevel(*level))
	}
	if len(prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prioritized))
	}
	blob, err := estargz.Build(io.NewSectionReader(src, 0, st.Size()), opts...)
	if err != nil {
		return fmt.Errorf("build: %w", err)
	}
	defer blob.Close()
	dst, err := os.Create(*out)
	if err != nil {
		return err
	}
	h := digest.Canonical.Digester()
	n, err := io.Copy(io.MultiWriter(dst, h.Hash()), blob)
	if err != nil {
		dst.Close()
		return fmt.Errorf("write %s: %w", *out, err)
	}
	if err := dst.Close(); err != nil {
		return err
	}
	usize, err := uncompressedSize(src, st.Size())
	if err != nil {
		return err
	}
	diffSize, err := decompressedSize(*out)
	if err != nil {
		return err
	}
	res := buildResult{
		Digest:            h.Digest().String(),
		Size:              n,
		DiffID:            blob.DiffID().String(),
		TOCDigest:         blob.TOCDigest().String(),
		UncompressedSize:  usize,
		DiffSize:          diffSize,
		MissedPrioritized: missed,
	}
	enc, err := json.Marshal(res)
	if err != nil {
		return err
	}
	if *metaPath != "" {
		if err := os.WriteFile(*metaPath, append(enc, '\n'), 0o644); err != nil {
			return err
		}
	}
	fmt.Println(string(enc))
	return nil
}

// uncompressedSize is the size of the source tar, decompressed when it is gzip.
func uncompressedSize(f *os.File, size int64) (int64, error) {
	var magic [2]byte
	if _, err := f.ReadAt(magic[:], 0); err != nil || magic != [2]byte{0x1f, 0x8b} {
		return size, nil
	}
	r, err := (&estargz.GzipDecompressor{}).Reader(io.NewSectionReader(f, 0, size))
	if err != nil {
		return 0, err
	}
	defer r.Close()
	return io.Copy(io.Discard, r)
}

// decompressedSize is the size of the tar the written blob decompresses to: the layer's
// io.containers.estargz.uncompressed-size annotation.
func decompressedSize(blob string) (int64, error) {
	f, err := os.Open(blob)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	r, err := (&estargz.GzipDecompressor{}).Reader(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		return 0, err
	}
	defer r.Close()
	return io.Copy(io.Discard, r)
}

type entryJSON struct {
	Path       string            `json:"path"`
	Type       string            `json:"type"`
	Mode       int64             `json:"mode"`
	Size       int64             `json:"size"`
	UID        int               `json:"uid"`
	GID        int               `json:"gid"`
	Uname      string            `json:"uname,omitempty"`
	Gname      string            `json:"gname,omitempty"`
	ModTime    string            `json:"modtime,omitempty"`
	LinkName   string            `json:"linkName,omitempty"`
	HardlinkOf string            `json:"hardlinkOf,omitempty"`
	DevMajor   int               `json:"devMajor,omitempty"`
	DevMinor   int               `json:"devMinor,omitempty"`
	Xattrs     map[string]string `json:"xattrs,omitempty"` // values base64
	Offset     int64             `json:"offset,omitempty"`
	Chunks     int               `json:"chunks,omitempty"`
	SHA256     string            `json:"sha256,omitempty"`
}

type verifyResult struct {
	TOCDigest      string      `json:"tocDigest"`
	DiffID         string      `json:"diffID"`
	ChunksVerified int         `json:"chunksVerified"`
	Entries        []entryJSON `json:"entries"`
}

func verify(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	want := fs.String("toc-digest", "", "expected TOC digest (checked when given)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("verify needs one BLOB argument")
	}
	f, err := os.Open(fs.Arg(0))
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	var v estargz.TOCEntryVerifier
	if *want != "" {
		d, err := digest.Parse(*want)
		if err != nil {
			return fmt.Errorf("toc digest: %w", err)
		}
		v, err = r.VerifyTOC(d)
		if err != nil {
			return fmt.Errorf("verify TOC: %w", err)
		}
	} else if v, err = r.Verifiers(); err != nil {
		return fmt.Errorf("verifiers: %w", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		return errors.New("no root directory in the TOC")
	}
	res := verifyResult{TOCDigest: r.TOCDigest().String(), Entries: []entryJSON{}}
	var walk func(dir string, e *estargz.TOCEntry) error
	walk = func(dir string, e *estargz.TOCEntry) error {
		names := []string{}
		e.ForeachChild(func(name string, _ *estargz.TOCEntry) bool {
			names = append(names, name)
			return true
		})
		sort.Strings(names)
		for _, name := range names {
			child, _ := e.LookupChild(name)
			p := path.Join(dir, name)
			ej, err := describe(r, v, p, child, &res.ChunksVerified)
			if err != nil {
				return err
			}
			res.Entries = append(res.Entries, ej)
			if child.Type == "dir" {
				if err := walk(p, child); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk("", root); err != nil {
		return err
	}
	diffID, err := blobDiffID(sr)
	if err != nil {
		return err
	}
	res.DiffID = diffID
	enc, err := json.Marshal(res)
	if err != nil {
		return err
	}
	fmt.Println(string(enc))
	return nil
}

func describe(r *estargz.Reader, v estargz.TOCEntryVerifier, p string, e *estargz.TOCEntry, verified *int) (entryJSON, error) {
	ej := entryJSON{
		Path: p, Type: e.Type, Mode: e.Mode, Size: e.Size, UID: e.UID, GID: e.GID,
		Uname: e.Uname, Gname: e.Gname, ModTime: e.ModTime3339, LinkName: e.LinkName,
		DevMajor: e.DevMajor, DevMinor: e.DevMinor, Offset: e.Offset,
	}
	if e.Name != p {
		// The reader resolves a hardlink to the entry it names; that entry keeps its own name.
		ej.HardlinkOf = e.Name
	}
	if len(e.Xattrs) > 0 {
		ej.Xattrs = map[string]string{}
		for k, val := range e.Xattrs {
			ej.Xattrs[k] = base64.StdEncoding.EncodeToString(val)
		}
	}
	if e.Type != "reg" {
		return ej, nil
	}
	fr, err := r.OpenFile(e.Name)
	if err != nil {
		return ej, fmt.Errorf("%s: %w", p, err)
	}
	whole := sha256.New()
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(e.Name, off)
		if !ok {
			return ej, fmt.Errorf("%s: no chunk at offset %d", p, off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return ej, fmt.Errorf("%s: chunk at %d starts at %d (size %d)", p, off, ce.ChunkOffset, ce.ChunkSize)
		}
		buf := make([]byte, ce.ChunkSize)
		if _, err := fr.ReadAt(buf, ce.ChunkOffset); err != nil && !(errors.Is(err, io.EOF) && ce.ChunkOffset+ce.ChunkSize == e.Size) {
			return ej, fmt.Errorf("%s: read chunk at %d: %w", p, off, err)
		}
		cv, err := v.Verifier(ce)
		if err != nil {
			return ej, fmt.Errorf("%s: chunk at %d: %w", p, off, err)
		}
		cv.Write(buf)
		if !cv.Verified() {
			return ej, fmt.Errorf("%s: chunk at %d does not match its digest", p, off)
		}
		whole.Write(buf)
		*verified++
		ej.Chunks++
		off += ce.ChunkSize
	}
	ej.SHA256 = "sha256:" + hex.EncodeToString(whole.Sum(nil))
	if e.Digest != "" && e.Digest != ej.SHA256 {
		return ej, fmt.Errorf("%s: contents %s, TOC says %s", p, ej.SHA256, e.Digest)
	}
	return ej, nil
}

// blobDiffID is the sha256 of the whole blob decompressed (concatenated gzip members).
func blobDiffID(sr *io.SectionReader) (string, error) {
	r, err := (&estargz.GzipDecompressor{}).Reader(io.NewSectionReader(sr, 0, sr.Size()))
	if err != nil {
		return "", err
	}
	defer r.Close()
	h := digest.Canonical.Digester()
	if _, err := io.Copy(h.Hash(), r); err != nil {
		return "", fmt.Errorf("decompress blob: %w", err)
	}
	return h.Digest().String(), nil
}
