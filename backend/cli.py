"""The `contactcenter` command: serve, worker, migrate, demo, create-provider-user, import-cdrs."""

from __future__ import annotations

import asyncio
import os

import click


@click.group()
def main() -> None:
    """Hosted multi-tenant contact center."""


@main.command()
@click.option("--host", default=lambda: os.environ.get("CC_HOST", "127.0.0.1"), show_default="127.0.0.1")
@click.option("--port", default=lambda: int(os.environ.get("CC_PORT", "8000")), type=int, show_default="8000")
@click.option("--workers", default=1, type=int, show_default=True, help="Processes (use the core count in production)")
@click.option("--reload", is_flag=True, help="Restart on code changes (development)")
def serve(host: str, port: int, workers: int, reload: bool) -> None:
    """Run the API server."""
    import uvicorn

    uvicorn.run(
        "backend.app:create_asgi_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        reload=reload,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )


@main.command()
def worker() -> None:
    """Run the background job worker (SAQ)."""
    from backend.config import get_settings
    from backend.lib.observability import configure_logging
    from backend.worker import build_worker

    configure_logging(get_settings())
    asyncio.run(build_worker().start())


@main.command()
@click.option("--revision", default="head", show_default=True)
def migrate(revision: str) -> None:
    """Apply database migrations (as the schema owner)."""
    from backend.db.migrate import upgrade

    upgrade(revision=revision)
    click.echo(f"database at {revision}")


@main.command()
def demo() -> None:
    """Create demo data (idempotent) and print the logins."""
    from dataclasses import replace

    from backend.config import get_settings
    from backend.demo import create_demo_data
    from backend.lib.observability import configure_logging

    configure_logging(replace(get_settings(), log_level="WARNING"))
    for line in asyncio.run(create_demo_data()):
        click.echo(line)


@main.command("create-provider-user")
@click.option("--email", required=True)
@click.option("--name", required=True)
@click.password_option()
def create_provider_user(email: str, name: str, password: str) -> None:
    """Create a provider operator account."""
    from backend.demo import ensure_provider_user

    asyncio.run(ensure_provider_user(email, name, password))
    click.echo(f"provider operator {email} ready")


@main.command("import-cdrs")
@click.option("--dir", "directory", default=None, help="mod_json_cdr's err-log-dir [CC_CDR_ERR_LOG_DIR]")
@click.option("--done-dir", default=None, help="Move imported files here, not delete them [CC_CDR_IMPORT_DONE_DIR]")
def import_cdrs(directory: str | None, done_dir: str | None) -> None:
    """Import the CDRs FreeSWITCH could not post (idempotent: a leg already stored is not stored twice)."""
    from pathlib import Path

    from backend.channels.voice.cdrs import ImportReport, import_cdr_directory
    from backend.channels.voice.service import VoiceSwitchboard
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker
    from backend.lib.observability import configure_logging
    from backend.lib.redis_client import make_redis
    from backend.worker import build_routing

    settings = get_settings()
    configure_logging(settings)
    source = directory or settings.cdr_err_log_dir
    if not source:
        raise click.UsageError("name the directory with --dir or CC_CDR_ERR_LOG_DIR")
    done = done_dir or settings.cdr_import_done_dir or None

    async def run() -> ImportReport:
        engine = make_engine(settings)
        redis = make_redis(settings.redis_url)
        try:
            sessionmaker = make_sessionmaker(engine)
            switchboard = VoiceSwitchboard(sessionmaker, redis, settings, build_routing(settings, sessionmaker, redis))
            return await import_cdr_directory(switchboard.cdrs, Path(source), Path(done) if done else None)
        finally:
            await redis.aclose()
            await engine.dispose()

    report = asyncio.run(run())
    click.echo(
        f"{report.imported} imported, {report.duplicates} already known, {report.unattributed} unattributed, "
        f"{report.rejected} rejected, {report.failed} failed"
    )
    if report.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
