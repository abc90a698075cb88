"""The `contactcenter` command: serve, worker, call-control, migrate, demo, create-provider-user, import-cdrs,
switch-sim."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import click


def run_forever(coroutine: Any) -> Any:
    """Run a long-lived server process's main coroutine on uvloop (as uvicorn runs the API), else asyncio's loop.

    A call-control process spends much of its time in socket I/O (a socket per call, PostgreSQL, Redis);
    uvloop's transports cost less per read and write. What start-up imported is left out of garbage collection
    (`settle_heap`), as the API does once it has started.
    """
    from backend.lib.runtime import settle_heap

    settle_heap()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


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
    run_forever(build_worker().start())


@main.command("call-control")
def call_control() -> None:
    """Run a call-control server (the dialplan's `socket` target); several processes may share its address."""
    from backend.channels.voice.call_control.process import run
    from backend.config import get_settings
    from backend.lib.observability import configure_logging

    settings = get_settings()
    configure_logging(settings)
    run_forever(run(settings))


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


@main.command("switch-sim")
@click.option("--esl-port", type=int, default=None, help="Inbound event socket port (CC_SIM_ESL_PORT, 8021; 0: any)")
@click.option("--control-port", type=int, default=None, help="Test-control HTTP port (CC_SIM_CONTROL_PORT, 8099)")
@click.option("--password", default=None, help="Event-socket password (CC_SIM_ESL_PASSWORD, ClueCon)")
@click.option("--hostname", default=None, help="The node's FreeSWITCH-Hostname (CC_SIM_HOSTNAME)")
@click.option("--xml-curl-url", default=None, help="xml_curl gateway-url for directory and dialplan")
@click.option("--cdr-url", default=None, help="mod_json_cdr url")
@click.option("--heartbeat", type=float, default=None, help="HEARTBEAT interval in seconds (CC_SIM_HEARTBEAT, 20)")
@click.option("--time-scale", type=float, default=None, help="Multiply media and ring durations (CC_SIM_TIME_SCALE)")
@click.option("--scenario", "scenarios", multiple=True, help="Scenario file (JSON or YAML) to play; repeatable")
def switch_sim(
    esl_port: int | None,
    control_port: int | None,
    password: str | None,
    hostname: str | None,
    xml_curl_url: str | None,
    cdr_url: str | None,
    heartbeat: float | None,
    time_scale: float | None,
    scenarios: tuple[str, ...],
) -> None:
    """Run a simulated FreeSWITCH node (ESL, xml_curl, json_cdr) for tests and the demo."""
    import logging
    from dataclasses import replace

    from backend.channels.voice.simulator import SimulatorConfig, load_scenario_file, serve

    logging.basicConfig(level=os.environ.get("CC_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    config = SimulatorConfig()
    overrides: dict[str, Any] = {
        "esl_port": esl_port,
        "control_port": control_port,
        "esl_password": password,
        "hostname": hostname,
        "xml_curl_url": xml_curl_url,
        "cdr_url": cdr_url,
        "heartbeat_interval": heartbeat,
        "time_scale": time_scale,
    }
    config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
    plans = [load_scenario_file(path) for path in scenarios]
    if config.scenario_dir:
        from pathlib import Path

        plans += [load_scenario_file(p) for p in sorted(Path(config.scenario_dir).glob("*")) if p.is_file()]
    run_forever(serve(config, plans))


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
