"""The customer store's logic: records and contact points, access by business unit, masking, versions,
search, screen pop, notes, history, merge, erasure and the tenant's custom fields.

Services run inside the caller's transaction, already scoped to the tenant by
row-level security. Every read goes through `Viewer` (business-unit scope and
masking) and every change is audited with before and after in the same
transaction.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

import msgspec
import structlog
from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    cast,
    delete,
    func,
    literal,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.config import get_settings
from backend.customers import tickets
from backend.customers.access import Viewer, check_version, expected_version, unit_member, viewer_for
from backend.customers.contacts import digits, mask_identity, normalise_email, normalise_phone, phone_lookup_values
from backend.customers.erasure import ErasureRequest, register_erasure_hook, run_erasure_hooks
from backend.customers.fields import FieldRule, check_values, missing_required
from backend.customers.models import Customer, CustomerFieldDef, CustomerIdentity, CustomerNote, CustomerSettings
from backend.customers.schemas import (
    CustomerCreate,
    CustomerOut,
    CustomerSettingsOut,
    CustomerSettingsUpdate,
    CustomerUpdate,
    FieldCreate,
    FieldOut,
    FieldUpdate,
    HistoryEntry,
    InteractionSummary,
    NoteCreate,
    NoteOut,
    PhoneOut,
    ScreenPopOut,
)
from backend.db.base import utcnow
from backend.db.engine import driver_connection, tenant_transaction
from backend.lib.masking import mask_address, mask_phone, mask_text
from backend.lib.pagination import PageRequest, paginate, paginate_rows
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound
from backend.lib.validation import clean_text
from backend.routing import service as routing_service
from backend.routing.schemas import InteractionOut
from backend.tenants import audit
from backend.tenants import service as tenants_service

log = structlog.get_logger("customers")

ERASED = "[erased]"
_OPENID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_KIND_OF_LIST = {"phones": "phone", "emails": "email", "wechat_openids": "wechat", "external_ids": "external"}


# --- per-tenant configuration: phone region and custom fields --------------------------------------


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """What reading and checking a record needs from the tenant's settings."""

    region: str | None
    rules: dict[str, FieldRule]


_CONFIG: dict[uuid.UUID, tuple[float, StoreConfig]] = {}


@lru_cache(maxsize=1)
def _zone_regions() -> dict[str, str]:
    """IANA zone -> the region whose country calling code is the zone's shortest prefix (Asia/Shanghai -> CN)."""
    import phonenumbers
    from phonenumbers.tzdata import TIMEZONE_DATA

    best: dict[str, str] = {}
    for prefix in sorted(TIMEZONE_DATA, key=lambda p: (len(p), p)):
        region = phonenumbers.region_code_for_country_code(int(prefix)) if prefix.isdigit() else "ZZ"
        if region == "ZZ":
            continue
        for zone in TIMEZONE_DATA[prefix]:
            best.setdefault(zone, region)
    return best


def region_for_zone(zone: str) -> str | None:
    """The phone region a tenant in `zone` most likely dials in (None for UTC and the like)."""
    return _zone_regions().get(zone)


def forget_config(tenant_id: uuid.UUID) -> None:
    """Drop this process's cached configuration of a tenant after a change."""
    _CONFIG.pop(tenant_id, None)


def cached_store_config(tenant_id: uuid.UUID) -> StoreConfig | None:
    """The tenant's configuration if this process read it in the last few seconds."""
    cached = _CONFIG.get(tenant_id)
    return cached[1] if cached is not None and cached[0] > time.monotonic() else None


async def store_config(session: AsyncSession, tenant_id: uuid.UUID) -> StoreConfig:
    """The tenant's phone region and active custom fields (cached for a few seconds per process)."""
    cached = cached_store_config(tenant_id)
    if cached is not None:
        return cached
    now = time.monotonic()
    chosen = await session.scalar(
        select(CustomerSettings.default_region).where(CustomerSettings.tenant_id == tenant_id)
    )
    region = chosen or region_for_zone((await tenants_service.get_tenant(session, tenant_id)).time_zone)
    definitions = await session.scalars(
        select(CustomerFieldDef).where(CustomerFieldDef.active.is_(True)).order_by(CustomerFieldDef.position)
    )
    config = StoreConfig(region, {d.key: FieldRule.of(d) for d in definitions.all()})
    _CONFIG[tenant_id] = (now + get_settings().customer_config_cache_seconds, config)
    return config


# --- contact points ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """A contact point about to be stored."""

    kind: str
    value: str
    raw: str
    valid: bool = True


def clean_contacts(lists: dict[str, Sequence[str]], region: str | None) -> tuple[list[Contact], list[dict[str, str]]]:
    """Contact points in canonical form, duplicates dropped; plus field errors. Bad phone numbers are kept, flagged."""
    settings = get_settings()
    contacts: list[Contact] = []
    errors: list[dict[str, str]] = []
    for field, values in lists.items():
        kind = _KIND_OF_LIST[field]
        if len(values) > settings.customer_phones_max:
            errors.append({"field": field, "message": f"at most {settings.customer_phones_max}"})
            continue
        seen: set[str] = set()
        for index, raw in enumerate(values):
            text = raw.strip()
            where = f"{field}[{index}]"
            if not text:
                errors.append({"field": where, "message": "must not be empty"})
                continue
            contact: Contact | None = None
            if kind == "phone":
                phone = normalise_phone(text, region)
                contact = Contact("phone", phone.value[:320], phone.raw[:320], phone.valid)
            elif kind == "email":
                email = normalise_email(text)
                if email is None:
                    errors.append({"field": where, "message": "is not a valid e-mail address"})
                    continue
                contact = Contact("email", email, text)
            elif kind == "wechat":
                if not _OPENID.match(text):
                    errors.append({"field": where, "message": "is not a WeChat OpenID (letters, digits, - and _)"})
                    continue
                contact = Contact("wechat", text, text)
            else:
                if len(text) > 120 or any(ord(c) < 32 for c in text):
                    errors.append({"field": where, "message": "must be at most 120 printable characters"})
                    continue
                contact = Contact("external", text, text)
            if contact.value not in seen:
                seen.add(contact.value)
                contacts.append(contact)
    return contacts, errors


def clean_tags(tags: Sequence[str], field: str = "tags") -> list[str]:
    """Tags trimmed, without duplicates, in the order given."""
    limit = get_settings().customer_tags_max
    cleaned = list(dict.fromkeys(clean_text(field, t, max_length=60) for t in tags))
    if len(cleaned) > limit:
        raise InvalidInput.field(field, f"at most {limit} tags")
    return cleaned


# --- reading ----------------------------------------------------------------------------------------


async def identities_of(
    session: AsyncSession, customer_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[CustomerIdentity]]:
    """Contact points of several customers, in their order."""
    found: dict[uuid.UUID, list[CustomerIdentity]] = {i: [] for i in customer_ids}
    if not customer_ids:
        return found
    rows = await session.scalars(
        select(CustomerIdentity)
        .where(CustomerIdentity.customer_id.in_(list(customer_ids)))
        .order_by(CustomerIdentity.customer_id, CustomerIdentity.kind, CustomerIdentity.position)
    )
    for identity in rows.all():
        found[identity.customer_id].append(identity)
    return found


class CustomerLike(Protocol):
    """What reading a record needs of it: a `Customer`, or the screen pop's lighter copy."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def name(self) -> str: ...
    @property
    def team_id(self) -> uuid.UUID | None: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def custom(self) -> dict[str, Any]: ...
    @property
    def version(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def merged_into_id(self) -> uuid.UUID | None: ...
    @property
    def erased_at(self) -> datetime | None: ...


class IdentityLike(Protocol):
    """What reading a contact point needs of it."""

    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def raw(self) -> str: ...
    @property
    def valid(self) -> bool: ...


def refs_of(customer: CustomerLike, identities: Sequence[IdentityLike]) -> list[str]:
    """How interactions may point at this customer: its id, or any of its addresses."""
    return [str(customer.id), *dict.fromkeys(i.value for i in identities)]


def customer_out(
    customer: CustomerLike, identities: Sequence[IdentityLike], config: StoreConfig, viewer: Viewer
) -> CustomerOut:
    """The record as this viewer may see it: contact points and sensitive custom fields masked without the right."""
    show = viewer.sensitive
    phones = [
        PhoneOut(i.value if show else mask_phone(i.value), i.valid, i.raw if show else None)
        for i in identities
        if i.kind == "phone"
    ]

    def values(kind: str) -> list[str]:
        return [i.value if show else mask_identity(kind, i.value) for i in identities if i.kind == kind]

    custom: dict[str, Any] = {}
    for key, rule in config.rules.items():
        if key in customer.custom and customer.custom[key] is not None:
            value = customer.custom[key]
            custom[key] = value if show or not rule.sensitive else mask_text(str(value))
    return CustomerOut(
        id=customer.id,
        name=customer.name,
        phones=phones,
        emails=values("email"),
        wechat_openids=values("wechat"),
        external_ids=values("external"),
        tags=list(customer.tags),
        team_id=customer.team_id,
        custom=custom,
        version=customer.version,
        masked=not show,
        created_at=customer.created_at,
        updated_at=customer.updated_at,
        merged_into_id=customer.merged_into_id,
        erased=customer.erased_at is not None,
    )


def snapshot(customer: Customer, identities: Sequence[CustomerIdentity]) -> dict[str, Any]:
    """The record for the audit log's before and after."""
    return {
        "name": customer.name,
        "team_id": str(customer.team_id) if customer.team_id else None,
        "tags": list(customer.tags),
        "custom": dict(customer.custom),
        "phones": [i.value for i in identities if i.kind == "phone"],
        "emails": [i.value for i in identities if i.kind == "email"],
        "wechat_openids": [i.value for i in identities if i.kind == "wechat"],
        "external_ids": [i.value for i in identities if i.kind == "external"],
        "version": customer.version,
    }


async def _visible(
    session: AsyncSession, viewer: Viewer, customer: CustomerLike, identities: Sequence[IdentityLike]
) -> bool:
    if viewer.owns_unit(customer.team_id):
        return True
    if viewer.user_id is None:
        return False
    # The agent handling (or just wrapping up) an interaction with this customer sees the record, whatever its unit.
    return await routing_service.agent_is_handling(
        session, viewer.user_id, refs_of(customer, identities), get_settings().customer_recent_contact_seconds
    )


async def _load(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, *, lock: bool = False
) -> tuple[Customer, list[CustomerIdentity]]:
    """A record the viewer may reach (404 otherwise, so other units' records are not revealed)."""
    statement = select(Customer).where(Customer.id == customer_id)
    customer = await session.scalar(statement.with_for_update() if lock else statement)
    if customer is None:
        raise NotFound("No such customer")
    identities = (await identities_of(session, [customer.id]))[customer.id]
    if not await _visible(session, viewer, customer, identities):
        raise NotFound("No such customer")
    return customer, identities


async def get_customer(session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID) -> CustomerOut:
    """One record, masked as the viewer must see it."""
    customer, identities = await _load(session, viewer, customer_id)
    return customer_out(customer, identities, await store_config(session, viewer.tenant_id), viewer)


def _scoped(statement: Select[Any], viewer: Viewer) -> Select[Any]:
    if viewer.all_units:
        return statement
    return statement.where(or_(Customer.team_id.is_(None), Customer.team_id.in_(list(viewer.team_ids))))


def _like(fragment: str) -> str:
    return "%" + fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search_statement(
    viewer: Viewer,
    *,
    region: str | None = None,
    q: str | None = None,
    phone: str | None = None,
    email: str | None = None,
    tags: Sequence[str] = (),
    team_id: uuid.UUID | None = None,
    external_id: str | None = None,
) -> Select[Any]:
    """Customers matching every filter given, within the viewer's units; merged and erased records left out.

    Fragments of phone numbers and e-mail addresses find records only for viewers who see them unmasked:
    for anyone else a search that matched `+86 138****1234` on `1381` then `1382` would give away the
    digits the mask hides, so they search by the whole number (read in the tenant's `region`) or address.
    """
    statement = select(Customer).where(Customer.merged_into_id.is_(None), Customer.erased_at.is_(None))
    text = (q or "").strip()
    if text:
        # A query of digits is a phone fragment, one with @ an e-mail fragment; anything else is a name.
        if "@" in text:
            email = email or text
        elif len(digits(text)) >= 3 and len(digits(text)) >= len(text.replace(" ", "").replace("+", "")) - 1:
            phone = phone or text
        else:
            statement = statement.where(
                or_(
                    Customer.name.ilike(_like(text)),
                    func.to_tsvector("simple", Customer.name).op("@@")(func.plainto_tsquery("simple", text)),
                )
            )
    if phone:
        fragment = digits(phone)
        if len(fragment) < 3:
            raise InvalidInput.field("phone", "give at least three digits")
        phone_match: ColumnElement[bool]
        if viewer.sensitive:
            phone_match = CustomerIdentity.value.like(_like(fragment))
        else:
            whole = normalise_phone(phone, region)
            if not whole.valid:
                raise InvalidInput.field("phone", "give the whole number: fragments need customers:read_sensitive")
            phone_match = CustomerIdentity.value.in_(phone_lookup_values(phone, region))
        statement = statement.where(
            Customer.id.in_(select(CustomerIdentity.customer_id).where(CustomerIdentity.kind == "phone", phone_match))
        )
    if email:
        fragment = email.strip().lower()
        if len(fragment) < 3:
            raise InvalidInput.field("email", "give at least three characters")
        email_match: ColumnElement[bool]
        if viewer.sensitive:
            email_match = CustomerIdentity.value.like(_like(fragment))
        else:
            address = normalise_email(email.strip())
            if address is None:
                raise InvalidInput.field("email", "give the whole address: fragments need customers:read_sensitive")
            email_match = CustomerIdentity.value == address
        statement = statement.where(
            Customer.id.in_(select(CustomerIdentity.customer_id).where(CustomerIdentity.kind == "email", email_match))
        )
    if external_id:
        statement = statement.where(
            Customer.id.in_(
                select(CustomerIdentity.customer_id).where(
                    CustomerIdentity.kind == "external", CustomerIdentity.value == external_id.strip()
                )
            )
        )
    for tag in tags:
        statement = statement.where(Customer.tags.contains([tag.strip()]))
    if team_id is not None:
        statement = statement.where(Customer.team_id == team_id)
    return _scoped(statement, viewer)


async def search_customers(
    session: AsyncSession, viewer: Viewer, page: PageRequest, **filters: Any
) -> tuple[list[CustomerOut], str | None]:
    """Search by name, phone fragment, e-mail, tags, unit or external id; cursor-paginated."""
    config = await store_config(session, viewer.tenant_id)
    rows, cursor = await paginate(
        session,
        search_statement(viewer, region=config.region, **filters),
        page,
        sortable={"name": Customer.name, "created_at": Customer.created_at, "updated_at": Customer.updated_at},
        default_sort="-updated_at",
        id_column=Customer.id,
    )
    identities = await identities_of(session, [c.id for c in rows])
    return [customer_out(c, identities[c.id], config, viewer) for c in rows], cursor


# --- writing ----------------------------------------------------------------------------------------


async def _check_team(session: AsyncSession, viewer: Viewer, team_id: uuid.UUID | None, field: str = "team_id") -> None:
    if team_id is None:
        return
    try:
        await tenants_service.get_team(session, team_id)
    except NotFound as exc:
        raise InvalidInput.field(field, "is not a team of this tenant") from exc
    if not viewer.owns_unit(team_id):
        raise Forbidden("You may only give records to your own business units", extra={"field": field})


async def _check_external_ids_free(
    session: AsyncSession, contacts: Sequence[Contact], customer_id: uuid.UUID | None
) -> None:
    external = [c.value for c in contacts if c.kind == "external"]
    if not external:
        return
    statement = select(CustomerIdentity.value).where(
        CustomerIdentity.kind == "external", CustomerIdentity.value.in_(external)
    )
    if customer_id is not None:
        statement = statement.where(CustomerIdentity.customer_id != customer_id)
    taken = list((await session.scalars(statement)).all())
    if taken:
        raise Conflict(
            "Another customer already has that external id",
            errors=[{"field": "external_ids", "message": f"{value} belongs to another customer"} for value in taken],
        )


def _identity_rows(tenant_id: uuid.UUID, customer_id: uuid.UUID, contacts: Sequence[Contact]) -> list[CustomerIdentity]:
    positions: dict[str, int] = {}
    rows = []
    for contact in contacts:
        position = positions.get(contact.kind, 0)
        positions[contact.kind] = position + 1
        rows.append(
            CustomerIdentity(
                tenant_id=tenant_id,
                customer_id=customer_id,
                kind=contact.kind,
                value=contact.value,
                raw=contact.raw,
                valid=contact.valid,
                position=position,
            )
        )
    return rows


async def create_customer(session: AsyncSession, viewer: Viewer, data: CustomerCreate) -> CustomerOut:
    """A new record; contact points normalised, custom fields checked, the owning unit one of the caller's."""
    config = await store_config(session, viewer.tenant_id)
    settings = get_settings()
    name = clean_text("name", data.name, max_length=200)
    contacts, errors = clean_contacts(
        {
            "phones": data.phones,
            "emails": data.emails,
            "wechat_openids": data.wechat_openids,
            "external_ids": data.external_ids,
        },
        config.region,
    )
    custom, problems = check_values(config.rules, data.custom, text_limit=settings.customer_text_field_max)
    problems += missing_required(config.rules, custom)
    errors += [{"field": f, "message": m} for f, m in problems]
    if errors:
        raise InvalidInput("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
    tags = clean_tags(data.tags)
    team_id = data.team_id
    if team_id is None and not viewer.all_units and len(viewer.team_ids) == 1:
        team_id = next(iter(viewer.team_ids))  # an agent's new records belong to their unit
    await _check_team(session, viewer, team_id)
    await _check_external_ids_free(session, contacts, None)
    now = utcnow()
    customer = Customer(
        tenant_id=viewer.tenant_id,
        id=uuid.uuid4(),
        name=name,
        team_id=team_id,
        tags=tags,
        custom={k: v for k, v in custom.items() if v is not None},
        version=1,
        created_by=viewer.actor_id,
        created_at=now,
        updated_at=now,
    )
    session.add(customer)
    await session.flush()
    identities = _identity_rows(viewer.tenant_id, customer.id, contacts)
    session.add_all(identities)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent create took the external id between check and insert
        raise Conflict("Another customer already has that external id") from exc
    await audit.record(
        session,
        action="customer.create",
        target_type="customer",
        target_id=customer.id,
        after=snapshot(customer, identities),
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return customer_out(customer, identities, config, viewer)


async def update_customer(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, data: CustomerUpdate, if_match: str | None
) -> CustomerOut:
    """Change a record at the version the client read (412 if someone changed it first)."""
    expected = expected_version(if_match)
    customer, identities = await _load(session, viewer, customer_id, lock=True)
    if customer.merged_into_id is not None or customer.erased_at is not None:
        raise Conflict("This record was merged or erased and can no longer change", kind="customer-closed")
    if not viewer.owns_unit(customer.team_id):
        raise Forbidden("This customer belongs to another business unit; you may read it while you handle it")
    check_version(customer.version, expected)
    config = await store_config(session, viewer.tenant_id)
    settings = get_settings()
    before = snapshot(customer, identities)
    lists = {field: value for field in _KIND_OF_LIST if (value := getattr(data, field)) is not msgspec.UNSET}
    contacts, errors = clean_contacts(lists, config.region)
    custom = dict(customer.custom)
    if data.custom is not msgspec.UNSET:
        changes, problems = check_values(config.rules, data.custom, text_limit=settings.customer_text_field_max)
        custom.update(changes)
        custom = {k: v for k, v in custom.items() if v is not None}
        problems += missing_required(config.rules, custom)
        errors += [{"field": f, "message": m} for f, m in problems]
    if errors:
        raise InvalidInput("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
    if data.name is not msgspec.UNSET:
        customer.name = clean_text("name", data.name, max_length=200)
    if data.tags is not msgspec.UNSET:
        customer.tags = clean_tags(data.tags)
    if data.team_id is not msgspec.UNSET and data.team_id != customer.team_id:
        await _check_team(session, viewer, data.team_id)
        customer.team_id = data.team_id
    customer.custom = custom
    if lists:
        await _check_external_ids_free(session, contacts, customer.id)
        kinds = [_KIND_OF_LIST[f] for f in lists]
        await session.execute(
            delete(CustomerIdentity).where(
                CustomerIdentity.customer_id == customer.id, CustomerIdentity.kind.in_(kinds)
            )
        )
        kept = [i for i in identities if i.kind not in kinds]
        fresh = _identity_rows(viewer.tenant_id, customer.id, contacts)
        session.add_all(fresh)
        identities = kept + fresh
    after = snapshot(customer, identities)
    if {k: v for k, v in after.items() if k != "version"} == {k: v for k, v in before.items() if k != "version"}:
        return customer_out(customer, identities, config, viewer)  # nothing changed: no new version, no entry
    customer.version += 1
    customer.updated_at = utcnow()
    after["version"] = customer.version
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("Another customer already has that external id") from exc
    await audit.record(
        session,
        action="customer.update",
        target_type="customer",
        target_id=customer.id,
        before=before,
        after=after,
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return customer_out(customer, identities, config, viewer)


async def delete_customer(session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, if_match: str | None) -> None:
    """Remove a record made by mistake (its notes go with it; tickets and interactions stay, detached)."""
    expected = expected_version(if_match)
    customer, identities = await _load(session, viewer, customer_id, lock=True)
    if not viewer.owns_unit(customer.team_id):
        raise Forbidden("This customer belongs to another business unit")
    check_version(customer.version, expected)
    before = snapshot(customer, identities)
    await session.delete(customer)
    await session.flush()
    await audit.record(
        session,
        action="customer.delete",
        target_type="customer",
        target_id=customer_id,
        before=before,
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )


# --- notes ------------------------------------------------------------------------------------------


def _note_out(note: CustomerNote) -> NoteOut:
    return NoteOut(
        note.id, note.customer_id, note.body, note.author_type, note.author_id, note.interaction_id, note.created_at
    )


async def add_note(session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, data: NoteCreate) -> NoteOut:
    """A note with its author and time (the agent handling the customer may write one whatever the unit)."""
    customer, _ = await _load(session, viewer, customer_id)
    limit = get_settings().customer_note_max
    if len(data.body) > limit:
        raise InvalidInput.field("body", f"must be at most {limit} characters")
    body = data.body.strip()
    if not body:
        raise InvalidInput.field("body", "must not be empty")
    if data.interaction_id is not None:
        try:
            await routing_service.interaction_for_customer_store(session, data.interaction_id)
        except NotFound as exc:
            raise InvalidInput.field("interaction_id", "is not an interaction of this tenant") from exc
    note = CustomerNote(
        tenant_id=viewer.tenant_id,
        customer_id=customer.id,
        author_id=viewer.actor_id,
        author_type=viewer.actor_type,
        body=body,
        interaction_id=data.interaction_id,
        created_at=utcnow(),
    )
    session.add(note)
    await session.flush()
    await audit.record(
        session,
        action="customer.note_add",
        target_type="customer",
        target_id=customer.id,
        after={"note_id": str(note.id), "body": body},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return _note_out(note)


async def list_notes(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, page: PageRequest
) -> tuple[list[NoteOut], str | None]:
    """A customer's notes, newest first."""
    customer, _ = await _load(session, viewer, customer_id)
    rows, cursor = await paginate(
        session,
        select(CustomerNote).where(CustomerNote.customer_id == customer.id),
        page,
        sortable={"created_at": CustomerNote.created_at},
        default_sort="-created_at",
        id_column=CustomerNote.id,
    )
    return [_note_out(n) for n in rows], cursor


# --- history ----------------------------------------------------------------------------------------


async def history(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, page: PageRequest
) -> tuple[list[HistoryEntry], str | None]:
    """Calls, chats, WeChat messages, callbacks, notes and tickets of a customer in one ordered view."""
    customer, identities = await _load(session, viewer, customer_id)
    contacts = routing_service.customer_interactions_select(refs_of(customer, identities))
    notes = select(
        CustomerNote.created_at.label("at"),
        literal("note").label("kind"),
        CustomerNote.id.label("id"),
        cast(null(), String).label("channel"),
        cast(null(), String).label("state"),
        cast(null(), String).label("outcome"),
        CustomerNote.author_id.label("actor_id"),
        CustomerNote.body.label("text"),
        cast(null(), Integer).label("number"),
    ).where(CustomerNote.customer_id == customer.id)
    ticket_rows = tickets.history_select(customer.id)
    entries = union_all(contacts, notes, ticket_rows).subquery("history")
    rows, cursor = await paginate_rows(
        session,
        select(entries),
        page,
        sortable={"at": entries.c.at},
        default_sort="-at",
        id_column=entries.c.id,
    )
    out = []
    for row in rows:
        text = row.text
        if row.kind == "interaction" and text and not viewer.sensitive:
            text = mask_address(text)
        out.append(
            HistoryEntry(
                at=row.at,
                kind=row.kind,
                id=row.id,
                channel=row.channel,
                state=row.state,
                outcome=row.outcome,
                actor_id=row.actor_id,
                text=text,
                ticket_number=row.number,
            )
        )
    return out, cursor


# --- screen pop -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Popped:
    """A record as the screen pop reads it: the attributes `customer_out` needs, without an ORM instance."""

    id: uuid.UUID
    name: str
    team_id: uuid.UUID | None
    tags: list[str]
    custom: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime
    merged_into_id: uuid.UUID | None = None
    erased_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class _PoppedIdentity:
    kind: str
    value: str
    raw: str
    valid: bool


def _utc(value: str) -> datetime:
    # JSON renders timestamps in the session's time zone; the ORM hands them out in UTC, and so must we.
    return datetime.fromisoformat(value).astimezone(UTC)


def _uuid(value: str | None) -> uuid.UUID | None:
    return uuid.UUID(value) if value else None


def _interaction_summary(
    viewer: Viewer,
    interaction_id: uuid.UUID,
    channel: str,
    state: str,
    outcome: str | None,
    ref: str | None,
    agent_id: uuid.UUID | None,
    queue_id: uuid.UUID | None,
    created_at: datetime,
    ended_at: datetime | None,
) -> InteractionSummary:
    if ref and not viewer.sensitive:
        ref = mask_address(ref)
    return InteractionSummary(
        id=interaction_id,
        channel=channel,
        state=state,
        outcome=outcome,
        customer_ref=ref,
        agent_id=agent_id,
        queue_id=queue_id,
        created_at=created_at,
        ended_at=ended_at,
    )


def _summary(interaction: InteractionOut, viewer: Viewer) -> InteractionSummary:
    i = interaction
    return _interaction_summary(
        viewer, i.id, i.channel, i.state, i.outcome, i.customer_ref, i.agent_id, i.queue_id, i.created_at, i.ended_at
    )


_POP_SQL = """
    SELECT c.id, c.name, c.team_id, c.tags, c.custom, c.version, c.created_at, c.updated_at,
      (SELECT coalesce(json_agg(json_build_array(i.kind, i.value, i.raw, i.valid) ORDER BY i.kind, i.position), '[]')
       FROM customer_identities i WHERE i.customer_id = c.id) AS identities,
      (SELECT coalesce(json_agg(json_build_array(t.id, t.number, t.subject, t.status, t.priority, t.due_at,
                                                 t.assignee_user_id, t.assignee_team_id) ORDER BY t.due_at), '[]')
       FROM tickets t WHERE t.customer_id = c.id AND t.status NOT IN ('resolved', 'closed')) AS tickets
    FROM customers c
    WHERE {match} AND c.merged_into_id IS NULL AND c.erased_at IS NULL
    ORDER BY c.updated_at DESC
    LIMIT :max
"""
_POP_BY_ADDRESS = text(
    _POP_SQL.format(
        match="c.id IN (SELECT i.customer_id FROM customer_identities i "
        "WHERE i.kind = :kind AND i.value = ANY(CAST(:values AS text[])))"
    )
)
_POP_BY_ID = text(_POP_SQL.format(match="c.id = :id"))


def _answer(
    viewer: Viewer,
    config: StoreConfig,
    *,
    lookup: str,
    kind: str | None,
    values: Sequence[str],
    customers: Sequence[_Popped],
    identities: dict[uuid.UUID, list[_PoppedIdentity]],
    ticket_rows: dict[uuid.UUID, list[Any]],
    interactions: list[InteractionSummary],
) -> ScreenPopOut:
    """The screen pop of the records the viewer may see, whichever way they were read."""
    shown = values[0] if values else ""
    if kind == "phone" and not viewer.sensitive:
        shown = mask_phone(shown)
    elif kind == "email" and not viewer.sensitive:
        shown = mask_identity("email", shown)
    open_tickets = tickets.summaries([t for c in customers for t in ticket_rows[c.id]])
    prefill: dict[str, Any] = {}
    if not customers and kind in ("phone", "email", "wechat") and values:
        field = {"phone": "phones", "email": "emails", "wechat": "wechat_openids"}[kind]
        prefill = {"name": "", field: [values[0] if viewer.sensitive else shown]}
    return ScreenPopOut(
        lookup=lookup,
        value=shown,
        known=bool(customers),
        customers=[customer_out(c, identities[c.id], config, viewer) for c in customers],
        interactions=interactions,
        open_tickets=open_tickets,
        new_customer=prefill,
    )


async def _pop(
    session: AsyncSession,
    viewer: Viewer,
    *,
    lookup: str,
    kind: str | None,
    values: Sequence[str],
    by_id: uuid.UUID | None = None,
    handling: bool = False,
) -> ScreenPopOut:
    settings = get_settings()
    config = await store_config(session, viewer.tenant_id)
    # The matching records, their contact points and their open tickets come back in one statement whose text
    # never changes (prepared once per connection).
    if by_id is not None:
        result = await session.execute(_POP_BY_ID, {"id": by_id, "max": settings.screen_pop_max_customers})
    else:
        result = await session.execute(
            _POP_BY_ADDRESS, {"kind": kind, "values": list(values), "max": settings.screen_pop_max_customers}
        )
    found: list[_Popped] = []
    identities: dict[uuid.UUID, list[_PoppedIdentity]] = {}
    ticket_rows: dict[uuid.UUID, list[Any]] = {}
    for row in result.all():
        customer = _Popped(
            row.id, row.name, row.team_id, list(row.tags), row.custom, row.version, row.created_at, row.updated_at
        )
        found.append(customer)
        identities[customer.id] = [_PoppedIdentity(k, v, r, ok) for k, v, r, ok in row.identities]
        ticket_rows[customer.id] = list(row.tickets)
    customers = [c for c in found if handling or await _visible(session, viewer, c, identities[c.id])]
    refs: list[str] = []
    for customer in customers:
        refs += refs_of(customer, identities[customer.id])
    recent = await routing_service.recent_customer_interactions(session, refs, settings.screen_pop_interactions)
    return _answer(
        viewer,
        config,
        lookup=lookup,
        kind=kind,
        values=values,
        customers=customers,
        identities=identities,
        ticket_rows=ticket_rows,
        interactions=[_summary(i, viewer) for i in recent],
    )


def _address(phone: str | None, email: str | None, wechat_openid: str | None) -> tuple[str, str]:
    given = [(k, v) for k, v in (("phone", phone), ("email", email), ("wechat", wechat_openid)) if v and v.strip()]
    if len(given) != 1:
        raise InvalidInput(
            "Give exactly one of phone, email or wechat_openid",
            errors=[{"field": "phone", "message": "give exactly one of phone, email, wechat_openid"}],
        )
    return given[0]


def _lookup_values(kind: str, value: str, region: str | None) -> list[str]:
    if kind == "phone":
        return phone_lookup_values(value, region)
    if kind == "email":
        return [normalise_email(value) or value.strip().lower()]
    return [value.strip()]


async def screen_pop(
    session: AsyncSession,
    viewer: Viewer,
    *,
    phone: str | None = None,
    email: str | None = None,
    wechat_openid: str | None = None,
) -> ScreenPopOut:
    """Who is this caller? By a number in any common format, an e-mail or a WeChat OpenID."""
    kind, value = _address(phone, email, wechat_openid)
    region = (await store_config(session, viewer.tenant_id)).region if kind == "phone" else None
    return await _pop(session, viewer, lookup=kind, kind=kind, values=_lookup_values(kind, value, region))


# As text: decoded by msgspec here, several times faster than the json codec the ORM installs on connections.
_POP_FUNCTION = "SELECT customer_screen_pop($1, $2, $3, $4, $5, $6)::text"


async def screen_pop_for_caller(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    principal: Principal,
    *,
    phone: str | None = None,
    email: str | None = None,
    wechat_openid: str | None = None,
) -> ScreenPopOut:
    """`screen_pop` for the request path, in one statement: the same answer, a fraction of the cost.

    The caller's teams, the records, their contact points, open tickets and latest interactions are read by
    `customer_screen_pop`, one call that sets the tenant and reads under row-level security in its own
    implicit transaction; no ORM session. A record outside the caller's units (which only an agent handling
    one of its interactions may see) sends the lookup down the general path, which decides that.
    """
    kind, value = _address(phone, email, wechat_openid)
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    config = cached_store_config(tenant_id)
    if config is None:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            config = await store_config(session, tenant_id)
    values = _lookup_values(kind, value, config.region)
    settings = get_settings()
    async with driver_connection(engine) as connection:
        raw = await connection.fetchval(
            _POP_FUNCTION,
            tenant_id,
            kind,
            values,
            settings.screen_pop_max_customers,
            settings.screen_pop_interactions,
            unit_member(principal),
        )
    rows, interaction_rows, teams = msgspec.json.decode(raw)
    viewer = viewer_for(principal, [uuid.UUID(t) for t in teams or ()])
    customers: list[_Popped] = []
    identities: dict[uuid.UUID, list[_PoppedIdentity]] = {}
    ticket_rows: dict[uuid.UUID, list[Any]] = {}
    for row_id, name, team_id, tags, custom, version, created_at, updated_at, contacts, open_tickets in rows:
        customer = _Popped(
            uuid.UUID(row_id), name, _uuid(team_id), tags, custom, version, _utc(created_at), _utc(updated_at)
        )
        if not viewer.owns_unit(customer.team_id):
            async with tenant_transaction(sessionmaker, tenant_id) as session:
                return await _pop(session, viewer, lookup=kind, kind=kind, values=values)
        customers.append(customer)
        identities[customer.id] = [_PoppedIdentity(k, v, r, ok) for k, v, r, ok in contacts]
        ticket_rows[customer.id] = open_tickets
    interactions = [
        _interaction_summary(
            viewer,
            uuid.UUID(i),
            channel,
            state,
            outcome,
            ref,
            _uuid(agent),
            _uuid(queue),
            _utc(created),
            _utc(ended) if ended else None,
        )
        for i, channel, state, outcome, ref, agent, queue, created, ended in interaction_rows
    ]
    return _answer(
        viewer,
        config,
        lookup=kind,
        kind=kind,
        values=values,
        customers=customers,
        identities=identities,
        ticket_rows=ticket_rows,
        interactions=interactions,
    )


def _address_kind(channel: str, ref: str) -> str:
    if channel == "wechat":
        return "wechat"
    return "email" if "@" in ref else "phone"


async def _pop_for(session: AsyncSession, viewer: Viewer, interaction: InteractionOut, handling: bool) -> ScreenPopOut:
    ref = (interaction.customer_ref or "").strip()
    if not ref:
        return ScreenPopOut("interaction", "", False, [], [], [], {})
    try:
        customer_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        customer_id = None
    if customer_id is not None:
        merged = await session.scalar(select(Customer.merged_into_id).where(Customer.id == customer_id))
        return await _pop(
            session, viewer, lookup="interaction", kind=None, values=[], by_id=merged or customer_id, handling=handling
        )
    kind = _address_kind(interaction.channel, ref)
    if kind == "phone":
        values = phone_lookup_values(ref, (await store_config(session, viewer.tenant_id)).region)
    elif kind == "email":
        values = [normalise_email(ref) or ref.lower()]
    else:
        values = [ref]
    return await _pop(session, viewer, lookup="interaction", kind=kind, values=values, handling=handling)


async def screen_pop_for_interaction(session: AsyncSession, viewer: Viewer, interaction_id: uuid.UUID) -> ScreenPopOut:
    """The caller of an interaction: its agent always sees the record (masked as their role says), others by unit."""
    interaction = await routing_service.interaction_for_customer_store(session, interaction_id)
    handling = viewer.user_id is not None and interaction.agent_id == viewer.user_id
    return await _pop_for(session, viewer, interaction, handling)


OfferContext = Callable[[uuid.UUID, uuid.UUID, InteractionOut], Awaitable[dict[str, Any]]]


def offer_screen_pop(sessionmaker: async_sessionmaker[AsyncSession]) -> OfferContext:
    """What the routing engine adds to an offer: the caller's screen pop, as the offered agent may see it.

    When exactly one record matches the caller's address, the interaction is attached to it, so its history
    stays with the customer even after the number changes.
    """

    async def provide(tenant_id: uuid.UUID, agent_id: uuid.UUID, interaction: InteractionOut) -> dict[str, Any]:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            found = await tenants_service.user_permissions(session, agent_id)
            permissions = found[1] if found else frozenset()
            shown = {
                "interaction": msgspec.to_builtins(routing_service.interaction_as_seen_by(interaction, permissions))
            }
            if "customers:read" not in permissions:
                return shown
            viewer = Viewer(tenant_id, agent_id, "user", agent_id, permissions, frozenset())
            pop = await _pop_for(session, viewer, interaction, handling=True)
            if len(pop.customers) == 1 and interaction.customer_ref != str(pop.customers[0].id):
                await routing_service.attach_customer(session, interaction.id, str(pop.customers[0].id))
        return {**shown, "screen_pop": msgspec.to_builtins(pop)}

    return provide


async def attach_interaction(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, interaction_id: uuid.UUID
) -> CustomerOut:
    """Attach an interaction to a customer (an unknown caller turned into a record, a mis-matched call)."""
    customer, identities = await _load(session, viewer, customer_id)
    if customer.merged_into_id is not None or customer.erased_at is not None:
        raise Conflict("This record was merged or erased", kind="customer-closed")
    before = await routing_service.interaction_for_customer_store(session, interaction_id)
    await routing_service.attach_customer(session, interaction_id, str(customer.id))
    await audit.record(
        session,
        action="customer.attach_interaction",
        target_type="customer",
        target_id=customer.id,
        before={"interaction_id": str(interaction_id), "customer_ref": before.customer_ref},
        after={"interaction_id": str(interaction_id), "customer_ref": str(customer.id)},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return customer_out(customer, identities, await store_config(session, viewer.tenant_id), viewer)


# --- merge and erasure ------------------------------------------------------------------------------


async def merge_customers(
    session: AsyncSession,
    viewer: Viewer,
    target_id: uuid.UUID,
    source_id: uuid.UUID,
    if_match: str | None,
    source_version: int,
) -> CustomerOut:
    """Fold `source` into `target`: contact points, notes, tickets and interactions move; both histories stay."""
    expected = expected_version(if_match)
    if source_id == target_id:
        raise InvalidInput.field("source_id", "must be another customer")
    # Lock in id order so two opposite merges cannot deadlock.
    first, second = sorted([target_id, source_id])
    locked = {i: await _load(session, viewer, i, lock=True) for i in (first, second)}
    target, target_ids = locked[target_id]
    source, source_ids = locked[source_id]
    for record, field in ((target, "customer_id"), (source, "source_id")):
        if record.merged_into_id is not None or record.erased_at is not None:
            raise Conflict(f"{field}: this record was merged or erased already", kind="customer-closed")
        if not viewer.owns_unit(record.team_id):
            raise Forbidden("Both records must belong to your business units", extra={"field": field})
    check_version(target.version, expected)
    check_version(source.version, source_version)
    before = {"target": snapshot(target, target_ids), "source": {"id": str(source.id), **snapshot(source, source_ids)}}
    held = {(i.kind, i.value) for i in target_ids}
    positions = {
        kind: sum(1 for i in target_ids if i.kind == kind) for kind in ("phone", "email", "wechat", "external")
    }
    for identity in source_ids:
        if (identity.kind, identity.value) in held:
            await session.delete(identity)
            continue
        identity.customer_id = target.id
        identity.position = positions[identity.kind]
        positions[identity.kind] += 1
        held.add((identity.kind, identity.value))
    await session.flush()
    notes_moved = await session.execute(
        update(CustomerNote).where(CustomerNote.customer_id == source.id).values(customer_id=target.id)
    )
    tickets_moved = await tickets.move_to_customer(session, source.id, target.id)
    interactions_moved = await routing_service.move_customer_interactions(session, str(source.id), str(target.id))
    target.tags = list(dict.fromkeys([*target.tags, *source.tags]))[: get_settings().customer_tags_max]
    target.custom = {**{k: v for k, v in source.custom.items() if v is not None}, **target.custom}
    if target.team_id is None:
        target.team_id = source.team_id
    now = utcnow()
    target.version += 1
    target.updated_at = now
    source.merged_into_id = target.id
    source.version += 1
    source.updated_at = now
    await session.flush()
    identities = (await identities_of(session, [target.id]))[target.id]
    moved = {
        "notes": int(notes_moved.rowcount),  # type: ignore[attr-defined]
        "tickets": tickets_moved,
        "interactions": interactions_moved,
    }
    await audit.record(
        session,
        action="customer.merge",
        target_type="customer",
        target_id=target.id,
        before=before,
        after={**snapshot(target, identities), "merged_from": str(source.id), "moved": moved},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    await audit.record(
        session,
        action="customer.merged_into",
        target_type="customer",
        target_id=source.id,
        before=before["source"],
        after={"merged_into_id": str(target.id), "version": source.version},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return customer_out(target, identities, await store_config(session, viewer.tenant_id), viewer)


async def _erase_notes_and_tickets(session: AsyncSession, request: ErasureRequest) -> int:
    notes = await session.execute(
        update(CustomerNote).where(CustomerNote.customer_id == request.customer_id).values(body=ERASED)
    )
    return int(notes.rowcount) + await tickets.anonymise_for_customer(  # type: ignore[attr-defined]
        session, request.customer_id, request.secrets
    )


register_erasure_hook("customer_notes_and_tickets", _erase_notes_and_tickets)


async def erase_customer(
    session: AsyncSession, viewer: Viewer, customer_id: uuid.UUID, if_match: str | None
) -> CustomerOut:
    """Anonymise a customer on request: the record, every registered copy, and the audit trail's old values.

    Interactions stay (and so do the statistics computed from them), pointing at the anonymised record.
    """
    expected = expected_version(if_match)
    customer, identities = await _load(session, viewer, customer_id, lock=True)
    if customer.erased_at is not None:
        raise Conflict("This customer was erased already", kind="customer-closed")
    if not viewer.owns_unit(customer.team_id):
        raise Forbidden("This customer belongs to another business unit")
    check_version(customer.version, expected)
    secrets = {customer.name}
    for identity in identities:
        secrets.update({identity.value, identity.raw})
    secrets |= {str(v) for v in customer.custom.values() if isinstance(v, str) and len(v) >= 3}
    request = ErasureRequest(
        tenant_id=viewer.tenant_id,
        customer_id=customer.id,
        refs=tuple(refs_of(customer, identities)),
        secrets=tuple(sorted(s for s in secrets if s)),
    )
    await session.execute(delete(CustomerIdentity).where(CustomerIdentity.customer_id == customer.id))
    customer.name = ERASED
    customer.tags = []
    customer.custom = {}
    customer.erased_at = utcnow()
    customer.version += 1
    customer.updated_at = customer.erased_at
    await session.flush()
    changed = await run_erasure_hooks(session, request)
    # The audit trail keeps who did what and when, but no longer the person's data.
    redacted = await audit.redact(session, target_type="customer", target_id=customer.id)
    await audit.record(
        session,
        action="customer.erase",
        target_type="customer",
        target_id=customer.id,
        after={"erased": True, "changed": changed, "audit_entries_redacted": redacted, "version": customer.version},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    log.info("customer_erased", customer_id=str(customer.id), changed=changed)
    return customer_out(customer, [], await store_config(session, viewer.tenant_id), viewer)


# --- settings and custom fields ---------------------------------------------------------------------


async def get_settings_out(session: AsyncSession, tenant_id: uuid.UUID) -> CustomerSettingsOut:
    """The tenant's customer-store settings."""
    chosen = await session.scalar(
        select(CustomerSettings.default_region).where(CustomerSettings.tenant_id == tenant_id)
    )
    return CustomerSettingsOut(chosen, (await store_config(session, tenant_id)).region)


async def put_settings(
    session: AsyncSession, principal: Principal, data: CustomerSettingsUpdate
) -> CustomerSettingsOut:
    """Set the region local phone numbers are read in."""
    import phonenumbers

    assert principal.tenant_id is not None
    if data.default_region is not None and data.default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidInput.field("default_region", "is not a region phone numbers are known for")
    row = await session.get(CustomerSettings, principal.tenant_id, with_for_update=True)
    before = {"default_region": row.default_region if row else None}
    if row is None:
        row = CustomerSettings(tenant_id=principal.tenant_id, default_region=data.default_region)
        session.add(row)
    else:
        row.default_region = data.default_region
    await session.flush()
    forget_config(principal.tenant_id)
    await audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action="customers.settings",
        target_type="customer_settings",
        target_id=principal.tenant_id,
        before=before,
        after={"default_region": data.default_region},
    )
    return await get_settings_out(session, principal.tenant_id)


def _field_out(d: CustomerFieldDef) -> FieldOut:
    return FieldOut(
        d.id,
        d.key,
        d.label,
        d.type,
        list(d.choices),
        d.required,
        d.sensitive,
        d.max_length,
        d.min_value,
        d.max_value,
        d.active,
        d.position,
    )


def _check_field_shape(type_: str, choices: Sequence[str], min_value: float | None, max_value: float | None) -> None:
    if type_ == "choice" and not choices:
        raise InvalidInput.field("choices", "a choice field needs at least one choice")
    if type_ != "choice" and choices:
        raise InvalidInput.field("choices", "only choice fields have choices")
    if len(set(choices)) != len(choices):
        raise InvalidInput.field("choices", "must not repeat")
    if (min_value is not None or max_value is not None) and type_ != "number":
        raise InvalidInput.field("min_value", "only number fields have bounds")
    if min_value is not None and max_value is not None and min_value > max_value:
        raise InvalidInput.field("max_value", "must not be below min_value")


async def list_fields(session: AsyncSession) -> list[FieldOut]:
    """The tenant's custom fields, in display order."""
    rows = await session.scalars(select(CustomerFieldDef).order_by(CustomerFieldDef.position, CustomerFieldDef.key))
    return [_field_out(d) for d in rows.all()]


async def create_field(session: AsyncSession, principal: Principal, data: FieldCreate) -> FieldOut:
    """A new custom field for every customer record of the tenant."""
    assert principal.tenant_id is not None
    _check_field_shape(data.type, data.choices, data.min_value, data.max_value)
    if await session.scalar(select(CustomerFieldDef.id).where(CustomerFieldDef.key == data.key)) is not None:
        raise Conflict("A field with that key exists", errors=[{"field": "key", "message": "already used"}])
    definition = CustomerFieldDef(
        tenant_id=principal.tenant_id,
        key=data.key,
        label=clean_text("label", data.label, max_length=120),
        type=data.type,
        choices=[clean_text("choices", c, max_length=120) for c in data.choices],
        required=data.required,
        sensitive=data.sensitive,
        max_length=data.max_length,
        min_value=data.min_value,
        max_value=data.max_value,
        position=data.position,
        active=True,
    )
    session.add(definition)
    await session.flush()
    forget_config(principal.tenant_id)
    await audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action="customer_field.create",
        target_type="customer_field",
        target_id=definition.id,
        after=msgspec.to_builtins(_field_out(definition)),
    )
    return _field_out(definition)


async def update_field(session: AsyncSession, principal: Principal, field_id: uuid.UUID, data: FieldUpdate) -> FieldOut:
    """Change a custom field's label, rules or order; its key and type stay (stored values depend on them)."""
    assert principal.tenant_id is not None
    definition = await session.scalar(select(CustomerFieldDef).where(CustomerFieldDef.id == field_id).with_for_update())
    if definition is None:
        raise NotFound("No such field")
    before = msgspec.to_builtins(_field_out(definition))
    for name in ("choices", "required", "sensitive", "max_length", "min_value", "max_value", "active", "position"):
        value = getattr(data, name)
        if value is not msgspec.UNSET:
            setattr(definition, name, value)
    if data.label is not msgspec.UNSET:
        definition.label = clean_text("label", data.label, max_length=120)
    _check_field_shape(definition.type, definition.choices, definition.min_value, definition.max_value)
    await session.flush()
    forget_config(principal.tenant_id)
    await audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action="customer_field.update",
        target_type="customer_field",
        target_id=definition.id,
        before=before,
        after=msgspec.to_builtins(_field_out(definition)),
    )
    return _field_out(definition)


async def delete_field(session: AsyncSession, principal: Principal, field_id: uuid.UUID) -> None:
    """Remove a custom field; values already stored stay in the records but are no longer shown or checked."""
    assert principal.tenant_id is not None
    definition = await session.scalar(select(CustomerFieldDef).where(CustomerFieldDef.id == field_id).with_for_update())
    if definition is None:
        raise NotFound("No such field")
    before = msgspec.to_builtins(_field_out(definition))
    await session.delete(definition)
    await session.flush()
    forget_config(principal.tenant_id)
    await audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action="customer_field.delete",
        target_type="customer_field",
        target_id=field_id,
        before=before,
    )
