"""Which generation a projector writes or serves (read_service.generations), and switching it.

At the start of a session the projector resolves the pointer: it serves the pointer's
generation when its version is the projector's own, builds a new generation (not ready until
it switches the pointer to it) when the pointer names an older version or nothing, and stays
not ready while the pointer names a newer version it cannot read. An old generation is dropped
after a grace period, for the queries still reading it. Without generations the key space is
fixed and all of this is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from read_service.context import TRANSIENT_ERRORS, ProjectionContext, ProjectorState
from read_service.generations import ParkedEvent, Plan, generation_version, parked_key
from read_service.probe import KeySpaceChanged
from read_service.view_store import ViewStore

logger = logging.getLogger(__name__)


class KeySpace:
    """Chooses, switches and drops one projection's generations; see the module docstring."""

    def __init__(self, ctx: ProjectionContext) -> None:
        self._ctx = ctx
        self._cleanup: set[asyncio.Task[None]] = set()

    async def choose(self) -> str | None:
        """Pick the generation to write; return the one it replaces when this session builds it.

        Returns None when the pointer's generation is served as it is. An outdated replica
        (the pointer names a newer version) stays not ready and waits for the pointer to move.
        """
        ctx = self._ctx
        generations = ctx.links.generations
        if generations is None:
            return None
        while True:
            resolution = await generations.resolve()
            if resolution.plan is not Plan.OUTDATED:
                break
            if ctx.state is not ProjectorState.OUTDATED:
                logger.error(
                    "the served generation %s was built by a newer version of this projection; not serving it",
                    resolution.generation,
                    extra={"projection": ctx.name, "version": generations.version},
                )
            ctx.state = ProjectorState.OUTDATED
            await ctx.set_ready(False)
            while await generations.current() == resolution.generation:  # noqa: ASYNC110 - a Redis key, polled
                await asyncio.sleep(ctx.options.probe_interval_s)
        self.use(resolution.generation)
        if resolution.plan is Plan.BUILD:
            logger.info(
                "building generation %s from the event log (replaces %s)",
                resolution.generation,
                resolution.replaces,
                extra={"projection": ctx.name},
            )
            await ctx.set_ready(False)
            return resolution.replaces or ""
        if generations.on_switch is not None:
            generations.on_switch(generations.prefix(resolution.generation))
        return None

    def use(self, generation: str) -> None:
        """Write to `generation` from now on (a no-op when it is already the one in use)."""
        ctx = self._ctx
        generations = ctx.links.generations
        if generations is None or generation == ctx.generation:
            return
        projection = generations.factory(generations.prefix(generation))
        ctx.projection = projection
        ctx.store = ViewStore(ctx.client, projection.checkpoint_key)
        ctx.generation = generation
        ctx.pending = 0
        # Another key space: its checkpoint is a new baseline, not a step back.
        ctx.published.publish_checkpoint(0)
        ctx.parked = None
        ctx.published.read_checkpoint.key_space_lost()

    async def follow(self) -> bool:
        """Serve the pointer's generation if this version can read it; False (not ready) otherwise."""
        ctx = self._ctx
        generations = ctx.links.generations
        if generations is None:
            return True
        current = await generations.current()
        try:
            servable = current is not None and generation_version(current) == generations.version
        except ValueError:
            servable = False
        if current is None or not servable:
            await ctx.set_ready(False)
            return False
        self.use(current)
        if generations.on_switch is not None:
            generations.on_switch(generations.prefix(current))
        return True

    async def holder_parked(self) -> ParkedEvent | None:
        """The event the served generation's projection is stopped at, if any (for a follower)."""
        ctx = self._ctx
        raw = await ctx.client.hget(parked_key(ctx.meta.base, ctx.name), ctx.generation or "")
        return None if raw is None else ParkedEvent.from_json(raw)

    async def finish_build(self, replaces: str) -> None:
        """Switch the pointer to the generation just built; drop the old one after a grace period."""
        ctx = self._ctx
        generations = ctx.links.generations
        built = ctx.generation
        assert generations is not None and built is not None
        if not await generations.switch(replaces or None, built):
            # Another replica switched first: drop this build and serve theirs.
            self._drop_later(built, 0.0)
            raise KeySpaceChanged(f"generation {await generations.current()} was switched in by another builder")
        logger.info("switched to generation %s", built, extra={"projection": ctx.name, "replaced": replaces})
        if generations.on_switch is not None:
            generations.on_switch(generations.prefix(built))
        await ctx.set_ready(True)
        if replaces:
            self._drop_later(replaces, ctx.options.switch_grace_s)

    async def forget(self) -> None:
        """Stop serving the generation in use: remove the pointer if it still names it (every replica
        then builds a new one from the log), or, without generations, the checkpoint."""
        ctx = self._ctx
        generations, generation = ctx.links.generations, ctx.generation
        if generations is None or generation is None:
            await ctx.client.delete(ctx.projection.checkpoint_key)
            return
        if await generations.forget(generation):
            self._drop_later(generation, ctx.options.switch_grace_s)

    async def close(self) -> None:
        """Stop the drops still waiting."""
        for cleanup in list(self._cleanup):
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError, *TRANSIENT_ERRORS):
                await cleanup

    def _drop_later(self, generation: str, delay_s: float) -> None:
        ctx = self._ctx
        generations = ctx.links.generations
        assert generations is not None

        async def cleanup() -> None:
            # Queries that started on the old key space finish within the grace period.
            await asyncio.sleep(delay_s)
            removed = await generations.drop(generation)
            logger.info("dropped generation %s (%s keys)", generation, removed, extra={"projection": ctx.name})

        task = asyncio.create_task(cleanup(), name=f"drop:{ctx.name}:{generation}")
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)
