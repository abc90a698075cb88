"""The application factory: plugins, routes, shared clients and their lifespan."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.types import ASGIApp

from backend.auth.authenticate import Authenticator
from backend.auth.controllers import ApiKeyController, AuthController, ProviderAuthController
from backend.auth.crypto import SecretBox
from backend.auth.guards import access_guard
from backend.auth.middleware import AuthenticationMiddleware
from backend.auth.revocation import Revocations
from backend.auth.service import AuthService
from backend.auth.sso import SsoService
from backend.auth.sso_controllers import SsoConfigController, SsoLoginController
from backend.auth.throttle import LoginThrottle
from backend.auth.tokens import TokenSigner
from backend.channels.voice.admission import AdmitEveryCall
from backend.channels.voice.call_control import CallDesk, CallStore
from backend.channels.voice.call_control.controllers import LiveCallController
from backend.channels.voice.call_control.outbound_calls import OutboundDesk
from backend.channels.voice.call_control.outbound_controllers import OutboundCallController
from backend.channels.voice.controllers import (
    CdrController,
    NumberController,
    NumberPoolController,
    SwitchController,
    SwitchNodeController,
)
from backend.channels.voice.media import PromptLibrary, PromptPlayer
from backend.channels.voice.media_controllers import (
    CarrierController,
    OutboundController,
    PromptController,
    QueueVoiceController,
    RecordingController,
    SupervisionController,
    SwitchMediaController,
    VoicemailController,
)
from backend.channels.voice.nodes import NodeAddressBook
from backend.channels.voice.outbound import OutboundGuard
from backend.channels.voice.recordings import CustomerStoreTickets, VoicemailDesk
from backend.channels.voice.service import VoiceSwitchboard
from backend.channels.voice.supervision import LiveSupervision, SupervisionDesk
from backend.channels.voice.xml_curl import XmlCurl
from backend.config import Settings, get_settings
from backend.customers.controllers import (
    CustomerConfigController,
    CustomerController,
    CustomerImportController,
    TicketController,
)
from backend.customers.service import offer_screen_pop
from backend.db.engine import make_engine, make_sessionmaker
from backend.db.session import provide_db_session
from backend.lib.health import healthz, metrics, readyz
from backend.lib.jobs import make_job_queue
from backend.lib.observability import OverloadMiddleware, RequestContextMiddleware, configure_logging
from backend.lib.openapi import document_routes
from backend.lib.pagination import page_request
from backend.lib.problems import exception_handlers
from backend.lib.redis_client import make_redis
from backend.lib.runtime import settle_heap
from backend.lib.storage import make_storage
from backend.routing.controllers import (
    AgentProfileController,
    AgentStateController,
    BusinessHoursController,
    InteractionController,
    IvrFlowController,
    PauseReasonController,
    QueueController,
    SkillController,
    WrapUpCodeController,
    agent_socket,
)
from backend.routing.engine import RoutingEngine
from backend.routing.hub import AgentHub
from backend.routing.matcher import Matcher
from backend.routing.realtime import register as register_routing_messages
from backend.tenants.controllers import (
    AuditController,
    OpsController,
    RoleController,
    SeatController,
    SignupController,
    TeamController,
    TenantController,
    UserController,
)

ROUTE_HANDLERS: list[Any] = [
    healthz,
    readyz,
    metrics,
    AuthController,
    ProviderAuthController,
    ApiKeyController,
    SsoConfigController,
    SsoLoginController,
    SignupController,
    TenantController,
    UserController,
    RoleController,
    TeamController,
    SeatController,
    AuditController,
    OpsController,
    agent_socket,
    SkillController,
    BusinessHoursController,
    QueueController,
    AgentProfileController,
    WrapUpCodeController,
    PauseReasonController,
    AgentStateController,
    InteractionController,
    SwitchController,
    SwitchNodeController,
    NumberPoolController,
    NumberController,
    CdrController,
    IvrFlowController,
    SwitchMediaController,
    PromptController,
    QueueVoiceController,
    RecordingController,
    VoicemailController,
    OutboundController,
    SupervisionController,
    CarrierController,
    LiveCallController,
    OutboundCallController,
    CustomerController,
    CustomerConfigController,
    CustomerImportController,
    TicketController,
]


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the Litestar application and the clients it shares between requests."""
    settings = settings or get_settings()
    configure_logging(settings)
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    redis = make_redis(settings.redis_url)
    signer = TokenSigner(settings)
    revocations = Revocations(redis, sessionmaker, settings.access_token_ttl_seconds)
    authenticator = Authenticator(settings, signer, revocations, redis, sessionmaker)
    auth_service = AuthService(sessionmaker, authenticator, LoginThrottle(redis, settings), settings)
    sso_service = SsoService(settings, redis, sessionmaker, auth_service)
    hub = AgentHub(authenticator, redis, settings.revocation_recheck_seconds, settings.agent_disconnect_grace_seconds)
    routing = RoutingEngine(sessionmaker, Matcher(redis), hub)
    routing.offer_context.append(offer_screen_pop(sessionmaker))
    register_routing_messages(hub, sessionmaker, routing)
    switch_sources = NodeAddressBook(sessionmaker, settings.switch_source_cache_seconds)
    voice = VoiceSwitchboard(sessionmaker, redis, settings, routing)
    xml_curl = XmlCurl(switch_sources, AdmitEveryCall(), settings.call_control_address, engine)
    storage = make_storage(settings)
    voicemail = VoicemailDesk(sessionmaker, storage, settings, routing, CustomerStoreTickets(sessionmaker))
    job_queue = make_job_queue(settings)
    outbound = OutboundGuard(sessionmaker, redis, settings)

    async def start_hub() -> None:
        await hub.start()
        await job_queue.connect()

    async def close_clients() -> None:
        await hub.stop()
        await storage.close()
        await job_queue.disconnect()
        await redis.aclose()
        await engine.dispose()

    app = Litestar(
        route_handlers=ROUTE_HANDLERS,
        state=State(
            {
                "settings": settings,
                "engine": engine,
                "sessionmaker": sessionmaker,
                "redis": redis,
                "authenticator": authenticator,
                "auth_service": auth_service,
                "sso_service": sso_service,
                "hub": hub,
                "routing": routing,
                "secret_box": SecretBox(settings.secret_key),
                "switch_sources": switch_sources,
                "voice": voice,
                "xml_curl": xml_curl,
                "storage": storage,
                "prompts": PromptLibrary(),
                "prompt_player": PromptPlayer(settings),
                "voicemail": voicemail,
                "outbound": outbound,
                "outbound_calls": OutboundDesk(sessionmaker, redis, outbound, routing, voice, settings),
                "supervision": SupervisionDesk(sessionmaker),
                "calls": CallDesk(sessionmaker, CallStore(redis, settings), settings),
                "live_supervision": LiveSupervision(
                    SupervisionDesk(sessionmaker), voice, CallStore(redis, settings), redis, settings
                ),
                "job_queue": job_queue,
            }
        ),
        dependencies={
            "db_session": Provide(provide_db_session),
            "settings": Provide(lambda: settings, sync_to_thread=False),
            "page": Provide(page_request, sync_to_thread=False),
        },
        middleware=[RequestContextMiddleware(), AuthenticationMiddleware()],
        guards=[access_guard],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.request_max_body_bytes,
        on_startup=[start_hub, settle_heap],
        on_shutdown=[close_clients],
        openapi_config=OpenAPIConfig(
            title="Contact Center API",
            version="1.0.0",
            path="/schema",
            description="Multi-tenant contact-center API. Errors are RFC 9457 problem+json.",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        debug=settings.debug,
    )
    document_routes(app, schema_path="/schema")
    return app


def create_asgi_app() -> ASGIApp:
    """What the server runs: the application behind overload protection (uvicorn --factory)."""
    settings = get_settings()
    return OverloadMiddleware(create_app(settings), settings.max_inflight_requests)
