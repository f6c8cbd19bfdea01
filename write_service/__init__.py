"""The write service: the command API of tessera (validate, decide, commit state + outbox + log)."""
