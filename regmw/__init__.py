"""regmw: pluggable WSGI middleware for container registries."""
from .backends import CompositeRateLimiter, Lease, RateLimitResult, Services, repository_key
from .config import ConfigError, Option, Section
from .context import RequestContext
from .errors import BackendUnavailable, Refusal, SlotUnavailable, StorageError
from .middleware import RegistryMiddleware
from .plugins import hookimpl
from .runtime import Runtime, build, cluster_slot, default_runtime

__all__ = [
    "BackendUnavailable", "CompositeRateLimiter", "SlotUnavailable", "cluster_slot", "default_runtime",
    "ConfigError", "Lease", "Option", "RateLimitResult", "Refusal", "RegistryMiddleware", "RequestContext",
    "Runtime", "Section", "Services", "StorageError", "build", "hookimpl", "repository_key",
]
__version__ = "0.1.0"
