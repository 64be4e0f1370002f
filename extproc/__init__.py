"""AI policy service for Envoy's ext_proc / ext_authz filters."""

__version__ = "0.1.0"
