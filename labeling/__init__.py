"""Human review of identities: queue, terminal app, scriptable label commands, contact sheets."""
