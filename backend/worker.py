"""Worker mode: background jobs on SAQ (Redis). Later capabilities add routing, rating and sync jobs here."""

from __future__ import annotations

import structlog
from saq import CronJob, Queue, Worker
from saq.types import Context
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.config import get_settings
from backend.db.engine import make_engine, make_sessionmaker
from backend.tenants.service import deliver_outbox

log = structlog.get_logger("worker")


class WorkerContext(Context, total=False):
    """What every job receives: SAQ's context plus the worker's database access."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]


async def deliver_mail(ctx: WorkerContext) -> int:
    """Send what waits in every tenant's mail outbox (in development: log it and mark it sent)."""
    sessionmaker = ctx["sessionmaker"]
    sent = await deliver_outbox(sessionmaker)
    if sent:
        log.info("mail_delivered", count=sent)
    return sent


async def _startup(ctx: WorkerContext) -> None:
    settings = get_settings()
    ctx["engine"] = make_engine(settings)
    ctx["sessionmaker"] = make_sessionmaker(ctx["engine"])


async def _shutdown(ctx: WorkerContext) -> None:
    await ctx["engine"].dispose()


def build_worker() -> Worker[WorkerContext]:
    """The SAQ worker with its jobs and schedules."""
    settings = get_settings()
    queue = Queue.from_url(settings.redis_url, name="contactcenter")
    return Worker(
        queue,
        functions=[deliver_mail],
        cron_jobs=[CronJob(deliver_mail, cron="* * * * *")],
        startup=_startup,
        shutdown=_shutdown,
        concurrency=10,
    )
