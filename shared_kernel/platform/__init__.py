"""How the processes run: process runtime, logging, tracing, metrics, the gRPC server plumbing
and error mapping, database and Redis clients, migrations, settings, backoff, the health probe
and security (bearer tokens, scopes, TLS, who is calling).

It may import `shared_kernel.contracts`; it imports no service.
"""
