"""The `contactcenter` command: serve, worker, migrate, demo, create-provider-user."""

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


if __name__ == "__main__":
    main()
