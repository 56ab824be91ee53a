"""Registry credentials: containers auth.json chain, docker config, credential helpers, the
podman auth-helper channel, and the registry token flow."""
