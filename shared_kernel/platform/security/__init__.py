"""Security of the gRPC servers: bearer tokens, scopes, the auth interceptor and TLS.

Import from the submodules (`tokens`, `scopes`, `authn`, `interceptor`, `tls`); this package
imports none of them, so `python -m shared_kernel.platform.security.tokens` runs cleanly.
"""
