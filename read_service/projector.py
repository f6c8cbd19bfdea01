"""The projector's public names, where the rest of the replica has always imported them from.

The runtime is split by concern: the runner (read_service.runner: life cycle, reconnects,
lease, health), one session (read_service.session: subscribe, then live apply), catch-up from
the event log (read_service.catch_up), batched apply (read_service.batches), parking
(read_service.parking), the key space probe (read_service.probe) and generations
(read_service.keyspace), sharing one ProjectionContext (read_service.context).
"""

from read_service.context import ParkingMode, ProjectorLinks, ProjectorOptions, ProjectorState
from read_service.runner import Projector, ProjectorStatus

__all__ = ["ParkingMode", "Projector", "ProjectorLinks", "ProjectorOptions", "ProjectorState", "ProjectorStatus"]
