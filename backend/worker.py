"""Worker mode: SAQ jobs (Redis), the routing timers, the switch watchdog and the switch nodes' inbound links.

Later capabilities add theirs here.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import structlog
from redis.asyncio import Redis
from saq import CronJob, Worker
from saq.types import Context
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.authenticate import Authenticator
from backend.auth.revocation import Revocations
from backend.auth.tokens import TokenSigner
from backend.channels.voice.cdrs import import_cdr_directory
from backend.channels.voice.links import SwitchLinks
from backend.channels.voice.recordings import sweep_missing_uploads
from backend.channels.voice.service import VoiceSwitchboard
from backend.config import Settings, get_settings
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
    voice: VoiceSwitchboard
    watchdog: asyncio.Task[None]
    links: SwitchLinks | None


async def deliver_mail(ctx: WorkerContext) -> int:
    """Send what waits in every tenant's mail outbox (in development: log it and mark it sent)."""
    sessionmaker = ctx["sessionmaker"]
    sent = await deliver_outbox(sessionmaker)
    if sent:
        log.info("mail_delivered", count=sent)
    return sent


async def import_switch_cdrs(ctx: WorkerContext) -> int:
    """Import the CDRs mod_json_cdr gave up posting (its err-log-dir, `CC_CDR_ERR_LOG_DIR`), if one is set."""
    settings = get_settings()
    if not settings.cdr_err_log_dir:
        return 0
    done = Path(settings.cdr_import_done_dir) if settings.cdr_import_done_dir else None
    report = await import_cdr_directory(ctx["voice"].cdrs, Path(settings.cdr_err_log_dir), done)
    return report.imported


async def sweep_media_uploads(ctx: WorkerContext) -> int:
    """Recordings and voicemail whose upload from the switch never came are marked failed, with a log line."""
    return await sweep_missing_uploads(ctx["sessionmaker"], get_settings())


def build_routing(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], redis: Redis) -> RoutingEngine:
    """A routing engine for a process without HTTP (worker, command line): it publishes through Redis."""
    authenticator = Authenticator(
        settings,
        TokenSigner(settings),
        Revocations(redis, sessionmaker, settings.access_token_ttl_seconds),
        redis,
        sessionmaker,
    )
    hub = AgentHub(authenticator, redis, settings.revocation_recheck_seconds)
    engine = RoutingEngine(sessionmaker, Matcher(redis), hub)
    engine.offer_context.append(offer_screen_pop(sessionmaker))
    return engine


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
    # So does the switch watchdog: each node's transition and failover is claimed by one UPDATE.
    redis = make_redis(settings.redis_url)
    engine = build_routing(settings, ctx["sessionmaker"], redis)
    ctx["redis"] = redis
    ctx["timers_stop"] = asyncio.Event()
    ctx["timers"] = asyncio.create_task(engine.run_timers(ctx["timers_stop"]), name="routing-timers")
    ctx["voice"] = VoiceSwitchboard(ctx["sessionmaker"], redis, settings, engine)
    ctx["watchdog"] = asyncio.create_task(ctx["voice"].run_watchdog(ctx["timers_stop"]), name="switch-watchdog")
    # Every worker competes for the switch nodes' inbound event sockets; a Redis lease gives each node
    # to exactly one of them at a time, and another takes over within seconds when its holder dies.
    links = SwitchLinks(ctx["voice"], redis, settings) if settings.esl_links_enabled else None
    if links is not None:
        await links.start()
    ctx["links"] = links


async def _shutdown(ctx: WorkerContext) -> None:
    links = ctx.get("links")
    if links is not None:
        await links.stop()  # leases released: another worker takes the nodes over within a poll
    ctx["timers_stop"].set()
    await ctx["timers"]
    await ctx["watchdog"]
    await ctx["redis"].aclose()
    await ctx["engine"].dispose()


def build_worker() -> Worker[WorkerContext]:
    """The SAQ worker with its jobs and schedules."""
    settings = get_settings()
    queue = make_job_queue(settings)
    return Worker(
        queue,
        functions=[deliver_mail, import_switch_cdrs, sweep_media_uploads, import_customers, requeue_imports],
        cron_jobs=[
            CronJob(deliver_mail, cron="* * * * *"),
            CronJob(import_switch_cdrs, cron="* * * * *"),
            CronJob(sweep_media_uploads, cron="*/5 * * * *"),
            CronJob(requeue_imports, cron="* * * * *"),
        ],
        startup=_startup,
        shutdown=_shutdown,
        concurrency=10,
    )
