"""Routes of the customer store: records, screen pop, history, notes, custom fields, import, export, tickets."""

from __future__ import annotations

import uuid
from typing import Any, Literal

import structlog
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_201_CREATED, HTTP_202_ACCEPTED
from saq import Queue
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.config import Settings
from backend.customers import export, importer, service, tickets
from backend.customers.access import Viewer, etag, viewer_of
from backend.customers.schemas import (
    CommentCreate,
    CustomerCreate,
    CustomerOut,
    CustomerSettingsOut,
    CustomerSettingsUpdate,
    CustomerUpdate,
    FieldCreate,
    FieldOut,
    FieldUpdate,
    HistoryEntry,
    ImportCreate,
    ImportOut,
    MergeRequest,
    NoteCreate,
    NoteOut,
    ScreenPopOut,
    SlaOut,
    SlaUpdate,
    TicketCreate,
    TicketOut,
    TicketUpdate,
)
from backend.db.session import after_commit
from backend.lib.pagination import Page, PageRequest
from backend.routing.hub import AgentHub
from backend.tenants import audit

log = structlog.get_logger("customers")
IfMatch = Parameter(header="If-Match", default=None, description="The ETag read; required on every change")
Text = Parameter(default=None, max_length=200)
TicketStatus = Literal["new", "open", "pending", "resolved", "closed"]
Priority = Literal["low", "normal", "high", "urgent"]


def _tagged(customer: CustomerOut, status_code: int = 200) -> Response[CustomerOut]:
    return Response(customer, status_code=status_code, headers={"ETag": etag(customer.version)})


def _ticket(ticket: TicketOut, status_code: int = 200) -> Response[TicketOut]:
    return Response(ticket, status_code=status_code, headers={"ETag": etag(ticket.version)})


def _notifier(request: Request[Principal, Any, Any], session: AsyncSession) -> tickets.Notify:
    """Ticket notifications go out through the agent hub once the change has committed."""
    hub: AgentHub = request.app.state.hub
    tenant_id = request.user.tenant_id
    assert tenant_id is not None

    def notify(user_id: uuid.UUID, payload: dict[str, Any]) -> None:
        after_commit(session, lambda: hub.publish(tenant_id, user_id, payload))

    return notify


async def _viewer(request: Request[Principal, Any, Any], session: AsyncSession) -> Viewer:
    return await viewer_of(session, request.user)


def _filters(
    q: str | None,
    phone: str | None,
    email: str | None,
    tag: list[str] | None,
    team_id: uuid.UUID | None,
    external_id: str | None,
) -> dict[str, Any]:
    return {"q": q, "phone": phone, "email": email, "tags": tag or [], "team_id": team_id, "external_id": external_id}


class CustomerController(Controller):
    """Customer records shared by the tenant's teams, scoped by business unit and masked by role."""

    path = "/api/v1/customers"
    tags = ["customers"]
    opt = {"access": "tenant"}

    @get("/", permission="customers:read", operation_id="search_customers")
    async def search(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        page: PageRequest,
        q: str | None = Text,
        phone: str | None = Parameter(default=None, max_length=40, description="Digits contained in a number"),
        email: str | None = Parameter(default=None, max_length=254, description="Text contained in an e-mail"),
        tag: list[str] | None = Parameter(default=None, description="Every tag given (repeat the parameter)"),
        team_id: uuid.UUID | None = None,
        external_id: str | None = Parameter(default=None, max_length=120),
    ) -> Page[CustomerOut]:
        """Search by name (words or fragment), phone fragment, e-mail, tags, unit or external id; sort name,
        created_at or updated_at."""
        viewer = await _viewer(request, db_session)
        items, cursor = await service.search_customers(
            db_session, viewer, page, **_filters(q, phone, email, tag, team_id, external_id)
        )
        return Page(items, cursor)

    @post("/", permission="customers:write", operation_id="create_customer")
    async def create(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: CustomerCreate
    ) -> Response[CustomerOut]:
        """A new customer record."""
        created = await service.create_customer(db_session, await _viewer(request, db_session), data)
        return _tagged(created, HTTP_201_CREATED)

    @get("/screen-pop", permission="customers:read", operation_id="screen_pop")
    async def screen_pop(
        self,
        request: Request[Principal, Any, Any],
        phone: str | None = Parameter(default=None, max_length=60),
        email: str | None = Parameter(default=None, max_length=254),
        wechat_openid: str | None = Parameter(default=None, max_length=128),
    ) -> ScreenPopOut:
        """Who is calling: by a number in any common format, an e-mail or a WeChat OpenID."""
        # No db_session: the request's ORM transaction would cost more than the whole lookup, which reads in
        # one statement of its own (see service.screen_pop_for_caller).
        state = request.app.state
        return await service.screen_pop_for_caller(
            state.engine, state.sessionmaker, request.user, phone=phone, email=email, wechat_openid=wechat_openid
        )

    @get(
        "/by-interaction/{interaction_id:uuid}", permission="customers:read", operation_id="screen_pop_for_interaction"
    )
    async def for_interaction(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, interaction_id: uuid.UUID
    ) -> ScreenPopOut:
        """The caller of an interaction; its agent always sees the record, whatever its unit."""
        return await service.screen_pop_for_interaction(db_session, await _viewer(request, db_session), interaction_id)

    @get("/export", permission="customers:export", operation_id="export_customers", media_type="text/csv")
    async def export_csv(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        q: str | None = Text,
        phone: str | None = Parameter(default=None, max_length=40),
        email: str | None = Parameter(default=None, max_length=254),
        tag: list[str] | None = Parameter(default=None),
        team_id: uuid.UUID | None = None,
        external_id: str | None = Parameter(default=None, max_length=120),
        encoding: Literal["utf-8", "gb18030"] = "utf-8",
    ) -> Stream:
        """The filtered customers as CSV, streamed; masked as your permissions say; audited."""
        viewer = await _viewer(request, db_session)
        filters = _filters(q, phone, email, tag, team_id, external_id)
        region = (await service.store_config(db_session, viewer.tenant_id)).region
        service.search_statement(viewer, region=region, **filters)  # refuse bad filters before the response starts
        await audit.record(
            db_session,
            action="customers.export",
            target_type="customer",
            after={
                "filters": {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in filters.items() if v},
                "masked": not viewer.sensitive,
                "encoding": encoding,
            },
            **viewer.audit_actor(),  # type: ignore[arg-type]
        )
        return Stream(
            export.export_csv(
                request.app.state.sessionmaker,
                viewer,
                filters,
                batch=settings.customer_export_batch_rows,
                encoding=encoding,
            ),
            media_type=f"text/csv; charset={encoding}",
            headers={"Content-Disposition": 'attachment; filename="customers.csv"'},
        )

    @get("/{customer_id:uuid}", permission="customers:read", operation_id="get_customer")
    async def get_customer(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, customer_id: uuid.UUID
    ) -> Response[CustomerOut]:
        """One customer; the ETag is what a change must send back in If-Match."""
        return _tagged(await service.get_customer(db_session, await _viewer(request, db_session), customer_id))

    @patch("/{customer_id:uuid}", permission="customers:write", operation_id="update_customer")
    async def update(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        customer_id: uuid.UUID,
        data: CustomerUpdate,
        if_match: str | None = IfMatch,
    ) -> Response[CustomerOut]:
        """Change a customer; 428 without If-Match, 412 if someone changed it since you read it."""
        viewer = await _viewer(request, db_session)
        return _tagged(await service.update_customer(db_session, viewer, customer_id, data, if_match))

    @delete("/{customer_id:uuid}", permission="customers:delete", operation_id="delete_customer")
    async def delete_customer(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        customer_id: uuid.UUID,
        if_match: str | None = IfMatch,
    ) -> None:
        """Delete a record made by mistake (to forget a person, erase instead)."""
        await service.delete_customer(db_session, await _viewer(request, db_session), customer_id, if_match)

    @post("/{customer_id:uuid}/merge", permission="customers:write", operation_id="merge_customers", status_code=200)
    async def merge(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        customer_id: uuid.UUID,
        data: MergeRequest,
        if_match: str | None = IfMatch,
    ) -> Response[CustomerOut]:
        """Merge another record into this one; both histories are kept; audited."""
        viewer = await _viewer(request, db_session)
        merged = await service.merge_customers(
            db_session, viewer, customer_id, data.source_id, if_match, data.source_version
        )
        return _tagged(merged)

    @post("/{customer_id:uuid}/erase", permission="customers:delete", operation_id="erase_customer", status_code=200)
    async def erase(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        customer_id: uuid.UUID,
        if_match: str | None = IfMatch,
    ) -> Response[CustomerOut]:
        """Anonymise a customer on request, everywhere their data was copied; statistics stay."""
        erased = await service.erase_customer(db_session, await _viewer(request, db_session), customer_id, if_match)
        return _tagged(erased)

    @get("/{customer_id:uuid}/history", permission="customers:read", operation_id="customer_history")
    async def history(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, customer_id: uuid.UUID, page: PageRequest
    ) -> Page[HistoryEntry]:
        """Calls, chats, WeChat messages, callbacks, notes and tickets in one ordered view (newest first)."""
        items, cursor = await service.history(db_session, await _viewer(request, db_session), customer_id, page)
        return Page(items, cursor)

    @get("/{customer_id:uuid}/notes", permission="customers:read", operation_id="list_customer_notes")
    async def notes(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, customer_id: uuid.UUID, page: PageRequest
    ) -> Page[NoteOut]:
        """A customer's notes, newest first."""
        items, cursor = await service.list_notes(db_session, await _viewer(request, db_session), customer_id, page)
        return Page(items, cursor)

    @post("/{customer_id:uuid}/notes", permission="customers:write", operation_id="add_customer_note")
    async def add_note(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, customer_id: uuid.UUID, data: NoteCreate
    ) -> NoteOut:
        """A note, signed with its author and time."""
        return await service.add_note(db_session, await _viewer(request, db_session), customer_id, data)

    @post(
        "/{customer_id:uuid}/interactions/{interaction_id:uuid}",
        permission="customers:write",
        operation_id="attach_interaction",
        status_code=200,
    )
    async def attach(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        customer_id: uuid.UUID,
        interaction_id: uuid.UUID,
    ) -> Response[CustomerOut]:
        """Attach an interaction to this customer (an unknown caller just turned into a record)."""
        viewer = await _viewer(request, db_session)
        return _tagged(await service.attach_interaction(db_session, viewer, customer_id, interaction_id))


class CustomerConfigController(Controller):
    """The tenant's custom fields and customer-store settings."""

    path = "/api/v1/customer-store"
    tags = ["customers"]
    opt = {"access": "tenant"}

    @get("/settings", permission="customers:read", operation_id="get_customer_settings")
    async def get_settings(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession
    ) -> CustomerSettingsOut:
        """The region local phone numbers are read in."""
        assert request.user.tenant_id is not None
        return await service.get_settings_out(db_session, request.user.tenant_id)

    @put("/settings", permission="customers:configure", operation_id="put_customer_settings")
    async def put_settings(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: CustomerSettingsUpdate
    ) -> CustomerSettingsOut:
        """Set the region local phone numbers are read in (null: from the tenant's time zone)."""
        return await service.put_settings(db_session, request.user, data)

    @get("/fields", permission="customers:read", operation_id="list_customer_fields")
    async def list_fields(self, db_session: AsyncSession) -> list[FieldOut]:
        """Custom fields of customer records."""
        return await service.list_fields(db_session)

    @post("/fields", permission="customers:configure", operation_id="create_customer_field")
    async def create_field(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: FieldCreate
    ) -> FieldOut:
        """A custom field: text, number, date or choice, with its checks."""
        return await service.create_field(db_session, request.user, data)

    @patch("/fields/{field_id:uuid}", permission="customers:configure", operation_id="update_customer_field")
    async def update_field(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, field_id: uuid.UUID, data: FieldUpdate
    ) -> FieldOut:
        """Change a custom field's label, checks or order."""
        return await service.update_field(db_session, request.user, field_id, data)

    @delete("/fields/{field_id:uuid}", permission="customers:configure", operation_id="delete_customer_field")
    async def delete_field(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, field_id: uuid.UUID
    ) -> None:
        """Remove a custom field."""
        await service.delete_field(db_session, request.user, field_id)


async def enqueue_import(queue: Queue, tenant_id: uuid.UUID, import_id: uuid.UUID, settings: Settings) -> None:
    """Hand an uploaded import to the workers; if Redis is away, the workers' sweep picks it up from PostgreSQL."""
    try:
        await importer.enqueue(queue, tenant_id, import_id, settings)
    except Exception:
        log.warning("customer_import_enqueue_failed", import_id=str(import_id), exc_info=True)


class CustomerImportController(Controller):
    """Bulk import of customers from CSV, as a background job with progress and an error report."""

    path = "/api/v1/customer-imports"
    tags = ["customers"]
    opt = {"access": "tenant"}

    @post("/", permission="customers:import", operation_id="create_customer_import")
    async def create(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: ImportCreate
    ) -> ImportOut:
        """Start an import with its options (mode, keys to match on, column mapping, encoding)."""
        return await importer.create_import(db_session, await _viewer(request, db_session), data)

    @get("/", permission="customers:import", operation_id="list_customer_imports")
    async def list_imports(self, db_session: AsyncSession, page: PageRequest) -> Page[ImportOut]:
        """Imports, newest first."""
        items, cursor = await importer.list_imports(db_session, page)
        return Page(items, cursor)

    @put(
        "/{import_id:uuid}/file",
        permission="customers:import",
        operation_id="upload_customer_import",
        status_code=HTTP_202_ACCEPTED,
        request_max_body_size=None,  # its own limit, CC_CUSTOMER_IMPORT_MAX_BYTES, is checked while streaming
    )
    async def upload(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        import_id: uuid.UUID,
        settings: Settings,
        file_name: str | None = Parameter(header="X-File-Name", default=None, max_length=255),
    ) -> ImportOut:
        """The CSV file as the raw request body (UTF-8 or GB18030), streamed; the import then runs in the background."""
        viewer = await _viewer(request, db_session)
        out = await importer.receive_file(db_session, viewer, import_id, request.stream(), settings, file_name)
        queue: Queue = request.app.state.job_queue
        tenant_id = viewer.tenant_id
        after_commit(db_session, lambda: enqueue_import(queue, tenant_id, import_id, settings))
        return out

    @get("/{import_id:uuid}", permission="customers:import", operation_id="get_customer_import")
    async def get_import(self, db_session: AsyncSession, import_id: uuid.UUID) -> ImportOut:
        """Progress: rows done, created, updated, skipped, errors, percent."""
        return await importer.get_import(db_session, import_id)

    @get(
        "/{import_id:uuid}/errors",
        permission="customers:import",
        operation_id="customer_import_errors",
        media_type="text/csv",
    )
    async def errors(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, import_id: uuid.UUID, settings: Settings
    ) -> Stream:
        """The refused rows as CSV: row, line, field, message."""
        await importer.get_import(db_session, import_id)  # 404 for another tenant's import
        assert request.user.tenant_id is not None
        return Stream(
            importer.error_report(
                request.app.state.sessionmaker, request.user.tenant_id, import_id, settings.customer_export_batch_rows
            ),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="import-{import_id}-errors.csv"'},
        )


class TicketController(Controller):
    """Tickets (work orders) with a status flow, SLA due times, comments and history."""

    path = "/api/v1/tickets"
    tags = ["tickets"]
    opt = {"access": "tenant"}

    @get("/", permission="tickets:read", operation_id="list_tickets")
    async def list_tickets(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        status: list[TicketStatus] | None = Parameter(default=None),
        priority: Priority | None = None,
        category: str | None = Parameter(default=None, max_length=60),
        customer_id: uuid.UUID | None = None,
        assignee_user_id: uuid.UUID | None = None,
        assignee_team_id: uuid.UUID | None = None,
        overdue: bool | None = None,
    ) -> Page[TicketOut]:
        """Tickets filtered by status, priority, category, customer, assignee or overdue; sort created_at, due_at,
        updated_at or number."""
        items, cursor = await tickets.list_tickets(
            db_session,
            page,
            status=status or [],
            priority=priority,
            category=category,
            customer_id=customer_id,
            assignee_user_id=assignee_user_id,
            assignee_team_id=assignee_team_id,
            overdue=overdue,
        )
        return Page(items, cursor)

    @post("/", permission="tickets:write", operation_id="create_ticket")
    async def create(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: TicketCreate
    ) -> Response[TicketOut]:
        """A ticket, by hand or from an interaction; its assignee is notified in real time."""
        viewer = await _viewer(request, db_session)
        created = await tickets.create_ticket(db_session, viewer, data, _notifier(request, db_session))
        return _ticket(created, HTTP_201_CREATED)

    @get("/sla", permission="tickets:read", operation_id="get_ticket_sla")
    async def get_sla(self, db_session: AsyncSession) -> SlaOut:
        """Minutes to resolve a ticket of each priority."""
        return await tickets.get_sla(db_session)

    @put("/sla", permission="tickets:configure", operation_id="put_ticket_sla")
    async def put_sla(self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: SlaUpdate) -> SlaOut:
        """Change the resolution time of priorities (new tickets and priority changes use it)."""
        return await tickets.put_sla(db_session, await _viewer(request, db_session), data)

    @get("/{ticket_id:uuid}", permission="tickets:read", operation_id="get_ticket")
    async def get_ticket(self, db_session: AsyncSession, ticket_id: uuid.UUID) -> Response[TicketOut]:
        """One ticket with its comments and full history."""
        return _ticket(await tickets.get_ticket(db_session, ticket_id))

    @patch("/{ticket_id:uuid}", permission="tickets:write", operation_id="update_ticket")
    async def update(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        ticket_id: uuid.UUID,
        data: TicketUpdate,
        if_match: str | None = IfMatch,
    ) -> Response[TicketOut]:
        """Change a ticket (status along new, open, pending, resolved, closed); 412 on a stale version."""
        viewer = await _viewer(request, db_session)
        changed = await tickets.update_ticket(
            db_session, viewer, ticket_id, data, if_match, _notifier(request, db_session)
        )
        return _ticket(changed)

    @post("/{ticket_id:uuid}/comments", permission="tickets:write", operation_id="comment_ticket")
    async def comment(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, ticket_id: uuid.UUID, data: CommentCreate
    ) -> Response[TicketOut]:
        """A comment on a ticket; its assignees are notified."""
        viewer = await _viewer(request, db_session)
        return _ticket(
            await tickets.add_comment(db_session, viewer, ticket_id, data, _notifier(request, db_session)),
            HTTP_201_CREATED,
        )
