package main

import (
	"context"
	"time"

	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/stargz-snapshotter/fs/source"
	dockercliconfig "github.com/docker/cli/cli/config"
	rhttp "github.com/hashicorp/go-retryablehttp"
)

const defaultRequestTimeout = 30 * time.Second

// resolverConfig mirrors the upstream [resolver] table: per registry host, mirrors tried first.
type resolverConfig struct {
	Host map[string]hostConfig `toml:"host"`
}

type hostConfig struct {
	Mirrors []mirrorConfig `toml:"mirrors"`
}

type mirrorConfig struct {
	Host              string `toml:"host"`
	Insecure          bool   `toml:"insecure"`           // plain http
	RequestTimeoutSec int    `toml:"request_timeout_sec"` // 0: 30 s, < 0: none
}

type credentialFunc func(host string, ref reference.Spec) (user, secret string, err error)

// registryHosts answers, for an image reference, the hosts to try: its mirrors, then the
// registry itself. Loopback registries (localhost, 127.0.0.1, ::1) use http, as containerd's
// MatchLocalhost decides; retries come from go-retryablehttp, as upstream.
func registryHosts(cfg resolverConfig, creds credentialFunc) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		name := ref.Hostname()
		var out []docker.RegistryHost
		for _, m := range append(append([]mirrorConfig{}, cfg.Host[name].Mirrors...), mirrorConfig{Host: name}) {
			rc := rhttp.NewClient()
			rc.Logger = nil
			client := rc.StandardClient()
			switch {
			case m.RequestTimeoutSec == 0:
				client.Timeout = defaultRequestTimeout
			case m.RequestTimeoutSec > 0:
				client.Timeout = time.Duration(m.RequestTimeoutSec) * time.Second
			}
			h := docker.RegistryHost{
				Client:       client,
				Host:         m.Host,
				Scheme:       "https",
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer: docker.NewDockerAuthorizer(
					docker.WithAuthClient(client),
					docker.WithAuthCreds(func(host string) (string, string, error) {
						if creds == nil {
							return "", "", nil
						}
						return creds(host, ref)
					})),
			}
			if local, _ := docker.MatchLocalhost(h.Host); local || m.Insecure {
				h.Scheme = "http"
			}
			if h.Host == "docker.io" {
				h.Host = "registry-1.docker.io"
			}
			out = append(out, h)
		}
		return out, nil
	}
}

// dockerConfigCredentials looks credentials up in the docker config file ($DOCKER_CONFIG or
// ~/.docker/config.json, credential helpers included).
func dockerConfigCredentials(ctx context.Context) credentialFunc {
	return func(host string, _ reference.Spec) (string, string, error) {
		cf, err := dockercliconfig.Load("")
		if err != nil {
			log.G(ctx).WithError(err).Warn("cannot load the docker config file")
			return "", "", nil
		}
		if host == "docker.io" || host == "registry-1.docker.io" {
			host = "https://index.docker.io/v1/"
		}
		ac, err := cf.GetAuthConfig(host)
		if err != nil {
			return "", "", err
		}
		if ac.IdentityToken != "" {
			return "", ac.IdentityToken, nil
		}
		return ac.Username, ac.Password, nil
	}
}

