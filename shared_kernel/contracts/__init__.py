"""What the processes must agree on: the event envelope and the outbox/event-log table, trace
context carried in envelopes, consistency tokens, identity keys, domain errors and the API's
field rules.

Nothing here imports `shared_kernel.platform`: a contract is stated without the machinery that
runs it.
"""
