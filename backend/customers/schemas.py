"""Request and response types of the customer store."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Address = Annotated[str, msgspec.Meta(min_length=1, max_length=320)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=60)]
FieldKey = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
Text = Annotated[str, msgspec.Meta(max_length=100_000)]
Addresses = Annotated[list[Address], msgspec.Meta(max_length=100)]
Priority = Literal["low", "normal", "high", "urgent"]
TicketStatus = Literal["new", "open", "pending", "resolved", "closed"]
MatchKey = Literal["phone", "email", "external_id"]


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A request body: unknown fields are an error, not silently ignored."""


# --- customers -----------------------------------------------------------------------------------


class CustomerCreate(Strict):
    name: Name
    phones: Addresses = []
    emails: Addresses = []
    wechat_openids: Addresses = []
    external_ids: Addresses = []
    tags: Annotated[list[Tag], msgspec.Meta(max_length=200)] = []
    team_id: uuid.UUID | None = None
    custom: dict[str, Any] = {}


class CustomerUpdate(Strict):
    """Lists replace the whole list; `custom` changes only the keys it names (null clears one)."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    phones: Addresses | msgspec.UnsetType = msgspec.UNSET
    emails: Addresses | msgspec.UnsetType = msgspec.UNSET
    wechat_openids: Addresses | msgspec.UnsetType = msgspec.UNSET
    external_ids: Addresses | msgspec.UnsetType = msgspec.UNSET
    tags: Annotated[list[Tag], msgspec.Meta(max_length=200)] | msgspec.UnsetType = msgspec.UNSET
    team_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    custom: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class PhoneOut(msgspec.Struct):
    number: str
    """E.164 (or as entered when it could not be parsed), masked for those without customers:read_sensitive."""
    valid: bool
    raw: str | None
    """As entered; null when masked."""


class CustomerOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    phones: list[PhoneOut]
    emails: list[str]
    wechat_openids: list[str]
    external_ids: list[str]
    tags: list[str]
    team_id: uuid.UUID | None
    custom: dict[str, Any]
    version: int
    masked: bool
    created_at: datetime
    updated_at: datetime
    merged_into_id: uuid.UUID | None = None
    erased: bool = False


class MergeRequest(Strict):
    """Merge `source_id` into the customer of the path; `source_version` is the source's ETag."""

    source_id: uuid.UUID
    source_version: int


class NoteCreate(Strict):
    body: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]
    interaction_id: uuid.UUID | None = None


class NoteOut(msgspec.Struct):
    id: uuid.UUID
    customer_id: uuid.UUID
    body: str
    author_type: str
    author_id: uuid.UUID | None
    interaction_id: uuid.UUID | None
    created_at: datetime


class InteractionSummary(msgspec.Struct):
    id: uuid.UUID
    channel: str
    state: str
    outcome: str | None
    customer_ref: str | None
    agent_id: uuid.UUID | None
    queue_id: uuid.UUID | None
    created_at: datetime
    ended_at: datetime | None


class TicketSummary(msgspec.Struct):
    id: uuid.UUID
    number: int
    subject: str
    status: str
    priority: str
    due_at: datetime
    overdue: bool
    assignee_user_id: uuid.UUID | None
    assignee_team_id: uuid.UUID | None


class ScreenPopOut(msgspec.Struct):
    """Who is calling: the matching customers (none for an unknown caller), their latest interactions, open tickets."""

    lookup: str
    """What was looked up (`phone`, `email`, `wechat`, `interaction`) ..."""
    value: str
    """... and the address, normalised (masked for those without customers:read_sensitive)."""
    known: bool
    customers: list[CustomerOut]
    interactions: list[InteractionSummary]
    open_tickets: list[TicketSummary]
    new_customer: dict[str, Any]
    """A CustomerCreate body pre-filled with the address, for turning an unknown caller into a record."""


class HistoryEntry(msgspec.Struct):
    """One entry of a customer's history: an interaction (call, chat, WeChat, callback), a note or a ticket."""

    at: datetime
    kind: str
    id: uuid.UUID
    channel: str | None
    state: str | None
    outcome: str | None
    actor_id: uuid.UUID | None
    text: str | None
    ticket_number: int | None


class CustomerSettingsOut(msgspec.Struct):
    default_region: str | None
    """ISO 3166 region that local phone numbers are read in; null means derived from the tenant's time zone."""
    effective_region: str | None


class CustomerSettingsUpdate(Strict):
    default_region: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")] | None


# --- custom fields -----------------------------------------------------------------------------------


class FieldCreate(Strict):
    key: FieldKey
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
    type: Literal["text", "number", "date", "choice"]
    choices: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=120)]], msgspec.Meta(max_length=200)
    ] = []
    required: bool = False
    sensitive: bool = False
    max_length: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    min_value: float | None = None
    max_value: float | None = None
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


class FieldUpdate(Strict):
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=120)] | msgspec.UnsetType = msgspec.UNSET
    choices: (
        Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=120)]], msgspec.Meta(max_length=200)]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    required: bool | msgspec.UnsetType = msgspec.UNSET
    sensitive: bool | msgspec.UnsetType = msgspec.UNSET
    max_length: Annotated[int, msgspec.Meta(ge=1, le=100000)] | msgspec.UnsetType | None = msgspec.UNSET
    min_value: float | msgspec.UnsetType | None = msgspec.UNSET
    max_value: float | msgspec.UnsetType | None = msgspec.UNSET
    active: bool | msgspec.UnsetType = msgspec.UNSET
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | msgspec.UnsetType = msgspec.UNSET


class FieldOut(msgspec.Struct):
    id: uuid.UUID
    key: str
    label: str
    type: str
    choices: list[str]
    required: bool
    sensitive: bool
    max_length: int | None
    min_value: float | None
    max_value: float | None
    active: bool
    position: int


# --- import ------------------------------------------------------------------------------------------


class ImportCreate(Strict):
    """Options of a bulk import; the file follows with PUT .../file."""

    mode: Literal["update", "skip"] = "update"
    """What a row matching an existing customer does."""
    match_on: Annotated[list[MatchKey], msgspec.Meta(min_length=1, max_length=3)] = msgspec.field(
        default_factory=lambda: ["phone", "email", "external_id"]
    )
    mapping: Annotated[dict[str, str], msgspec.Meta(max_length=200)] = {}
    """{CSV column: field}: name, phone, email, wechat_openid, external_id, tags, team, custom.<key>, ignore."""
    encoding: Literal["auto", "utf-8", "gb18030"] = "auto"
    team_id: uuid.UUID | None = None
    """The business unit of new records (the caller's own unit when they have exactly one)."""
    file_name: Annotated[str, msgspec.Meta(max_length=255)] | None = None


class ImportOut(msgspec.Struct):
    id: uuid.UUID
    status: str
    mode: str
    match_on: list[str]
    mapping: dict[str, str]
    encoding: str
    detected_encoding: str | None
    file_name: str | None
    file_bytes: int
    rows_done: int
    created: int
    updated: int
    unchanged: int
    skipped: int
    errors: int
    percent: float
    failure: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# --- tickets -------------------------------------------------------------------------------------------


class TicketCreate(Strict):
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    description: Text = ""
    priority: Priority = "normal"
    category: Annotated[str, msgspec.Meta(min_length=1, max_length=60)] | None = None
    customer_id: uuid.UUID | None = None
    interaction_id: uuid.UUID | None = None
    """A ticket made from an interaction is attached to that interaction's customer."""
    assignee_user_id: uuid.UUID | None = None
    assignee_team_id: uuid.UUID | None = None


class TicketUpdate(Strict):
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=300)] | msgspec.UnsetType = msgspec.UNSET
    description: Text | msgspec.UnsetType = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    category: Annotated[str, msgspec.Meta(min_length=1, max_length=60)] | msgspec.UnsetType | None = msgspec.UNSET
    status: TicketStatus | msgspec.UnsetType = msgspec.UNSET
    customer_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    assignee_user_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    assignee_team_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET


class TicketEventOut(msgspec.Struct):
    id: uuid.UUID
    kind: str
    author_id: uuid.UUID | None
    body: str | None
    changes: dict[str, Any]
    at: datetime


class TicketOut(msgspec.Struct):
    id: uuid.UUID
    number: int
    subject: str
    description: str
    priority: str
    category: str | None
    status: str
    customer_id: uuid.UUID | None
    interaction_id: uuid.UUID | None
    assignee_user_id: uuid.UUID | None
    assignee_team_id: uuid.UUID | None
    due_at: datetime
    overdue: bool
    resolved_at: datetime | None
    closed_at: datetime | None
    created_by: uuid.UUID | None
    version: int
    created_at: datetime
    updated_at: datetime
    history: list[TicketEventOut] | None = None


class CommentCreate(Strict):
    body: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]


class SlaOut(msgspec.Struct):
    """Minutes to resolve a ticket of each priority."""

    urgent: int
    high: int
    normal: int
    low: int


class SlaUpdate(Strict):
    urgent: Annotated[int, msgspec.Meta(ge=1, le=525_600)] | msgspec.UnsetType = msgspec.UNSET
    high: Annotated[int, msgspec.Meta(ge=1, le=525_600)] | msgspec.UnsetType = msgspec.UNSET
    normal: Annotated[int, msgspec.Meta(ge=1, le=525_600)] | msgspec.UnsetType = msgspec.UNSET
    low: Annotated[int, msgspec.Meta(ge=1, le=525_600)] | msgspec.UnsetType = msgspec.UNSET
