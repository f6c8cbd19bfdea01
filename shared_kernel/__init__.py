"""The shared kernel: contracts and plumbing used by the write service, relay and read service.

It imports none of the services, and the services never import each other.
"""
