"""Worker mode: background jobs on SAQ (Redis) and the routing timers. Later capabilities add theirs here."""

from __future__ import annotations

import asyncio
import uuid

import structlog
from redis.asyncio import Redis
from saq import CronJob, Worker
from saq.types import Context
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.authenticate import Authenticator
from backend.auth.revocation import Revocations
from backend.auth.tokens import TokenSigner
from backend.config import get_settings
from backend.customers.importer import requeue_unfinished, run_import
from backend.customers.service import offer_screen_pop
from backend.db.engine import make_engine, make_sessionmaker
from backend.lib.jobs import make_job_queue
from backend.lib.redis_client import make_redis
from backend.routing.engine import RoutingEngine
from backend.routing.hub import AgentHub
from backend.routing.matcher import Matcher
from backend.tenants.service import deliver_outbox

log = structlog.get_logger("worker")


class WorkerContext(Context, total=False):
    """What every job receives: SAQ's context plus the worker's database access."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    timers_stop: asyncio.Event
    timers: asyncio.Task[None]


async def deliver_mail(ctx: WorkerContext) -> int:
    """Send what waits in every tenant's mail outbox (in development: log it and mark it sent)."""
    sessionmaker = ctx["sessionmaker"]
    sent = await deliver_outbox(sessionmaker)
    if sent:
        log.info("mail_delivered", count=sent)
    return sent


async def import_customers(ctx: WorkerContext, *, tenant_id: str, import_id: str) -> dict[str, object]:
    """Import one uploaded customer file (resumes after its last committed batch when retried)."""
    return await run_import(ctx["sessionmaker"], uuid.UUID(tenant_id), uuid.UUID(import_id))


async def requeue_imports(ctx: WorkerContext) -> int:
    """Sweep: imports whose job was lost (Redis restarted or flushed) are queued again and resume where they were."""
    handed = await requeue_unfinished(ctx["sessionmaker"], ctx["worker"].queue)
    if handed:
        log.warning("customer_imports_requeued", count=handed)
    return handed


async def _startup(ctx: WorkerContext) -> None:
    settings = get_settings()
    ctx["engine"] = make_engine(settings)
    ctx["sessionmaker"] = make_sessionmaker(ctx["engine"])
    # Routing timers (offer expiry, relaxing skills, maximum waits, wrap-up) run in every worker;
    # each timer is popped atomically, so several workers share the work without doing it twice.
    redis = make_redis(settings.redis_url)
    authenticator = Authenticator(
        settings,
        TokenSigner(settings),
        Revocations(redis, ctx["sessionmaker"], settings.access_token_ttl_seconds),
        redis,
        ctx["sessionmaker"],
    )
    hub = AgentHub(authenticator, redis, settings.revocation_recheck_seconds)
    engine = RoutingEngine(ctx["sessionmaker"], Matcher(redis), hub)
    engine.offer_context.append(offer_screen_pop(ctx["sessionmaker"]))
    ctx["redis"] = redis
    ctx["timers_stop"] = asyncio.Event()
    ctx["timers"] = asyncio.create_task(engine.run_timers(ctx["timers_stop"]), name="routing-timers")


async def _shutdown(ctx: WorkerContext) -> None:
    ctx["timers_stop"].set()
    await ctx["timers"]
    await ctx["redis"].aclose()
    await ctx["engine"].dispose()


def build_worker() -> Worker[WorkerContext]:
    """The SAQ worker with its jobs and schedules."""
    settings = get_settings()
    queue = make_job_queue(settings)
    return Worker(
        queue,
        functions=[deliver_mail, import_customers, requeue_imports],
        cron_jobs=[CronJob(deliver_mail, cron="* * * * *"), CronJob(requeue_imports, cron="* * * * *")],
        startup=_startup,
        shutdown=_shutdown,
        concurrency=10,
    )
