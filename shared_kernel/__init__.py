"""The shared kernel of the processes, in two halves.

`contracts` is what the write service, relay, read replicas and saga worker must agree on;
`platform` is how each of them runs. Contracts import nothing of the platform, the kernel
imports none of the services, and the services never import each other.
"""
