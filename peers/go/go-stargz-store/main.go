// Command go-stargz-store mounts the Go reference stargz store (the `store` package of
// containerd/stargz-snapshotter as packaged by Debian, v0.12.0) as a containers/storage
// additional layer store, so tests and benchmarks can run the reference beside our daemon.
//
// Debian ships the library without its stargz-store command; this is our own minimal main:
//
//	go-stargz-store [-root DIR] [-config FILE] [-log-level LEVEL] MOUNTPOINT
//
// The config file is the Go store's TOML (fs/config.Config at the top level, plus a
// [resolver] table of per-host mirrors). Registries on localhost / 127.0.0.1 are reached over
// plain http by the library's resolver without any configuration; other insecure hosts need a
// [[resolver.host."HOST".mirrors]] entry with insecure = true. Credentials come from the docker
// config file (~/.docker/config.json), as the upstream command did in this version. Debian's
// package cannot build service/resolver (it needs the CRI API, not packaged), so the small
// resolver here (hosts.go) is ours.
//
// The process mounts, logs "mounted" and serves until SIGINT or SIGTERM, then unmounts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/fs/config"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/store"
	toml "github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
)

// storeConfig is the TOML file's shape: the filesystem settings inline, resolver under
// [resolver] (the upstream command's layout).
type storeConfig struct {
	config.Config
	Resolver resolverConfig `toml:"resolver"`
}

func main() {
	root := flag.String("root", "/var/lib/go-stargz-store", "directory for the store's state and cache")
	configPath := flag.String("config", "", "TOML configuration file (optional)")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn or error")
	flag.Parse()
	if err := run(*root, *configPath, *logLevel, flag.Args()); err != nil {
		fmt.Fprintf(os.Stderr, "go-stargz-store: %v\n", err)
		os.Exit(1)
	}
}

func run(root, configPath, logLevel string, args []string) error {
	if len(args) != 1 {
		return errors.New("usage: go-stargz-store [-root DIR] [-config FILE] [-log-level LEVEL] MOUNTPOINT")
	}
	mountpoint := args[0]
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg storeConfig
	if configPath != "" {
		tree, err := toml.LoadFile(configPath)
		if err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
		if err := tree.Unmarshal(&cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	if cfg.DisableVerification {
		return errors.New("content verification cannot be disabled")
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(mountpoint, 0o755); err != nil {
		return err
	}
	hosts := registryHosts(cfg.Resolver, dockerConfigCredentials(ctx))
	lm, err := store.NewLayerManager(ctx, root, hosts, memorymetadata.NewReader, cfg.Config)
	if err != nil {
		return fmt.Errorf("layer manager: %w", err)
	}
	if err := store.Mount(ctx, mountpoint, lm, cfg.Debug); err != nil {
		return fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	log.G(ctx).WithField("mountpoint", mountpoint).Info("mounted")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	s := <-sig
	log.G(ctx).WithField("signal", s.String()).Info("unmounting")
	if err := syscall.Unmount(mountpoint, 0); err != nil {
		// Busy: detach it so the mountpoint does not stay dead (ENOTCONN) after we exit.
		if err2 := syscall.Unmount(mountpoint, syscall.MNT_DETACH); err2 != nil {
			return fmt.Errorf("unmount %s: %w", mountpoint, err)
		}
	}
	return nil
}
