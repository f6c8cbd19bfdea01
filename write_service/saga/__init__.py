"""The order saga: reserve stock, authorize the payment, capture and confirm; compensate on failure.

The worker (`python -m write_service.saga`) drives the sagas persisted in `saga_executions`
and `saga_steps`. Every step writes its local effects, its outbox events, the execution row
and a step-log row in one transaction, so a crash anywhere leaves a state the next attempt
resumes from.
"""
