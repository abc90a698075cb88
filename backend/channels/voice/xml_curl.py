"""mod_xml_curl's two questions, answered: who is this SIP user (directory) and where does this call go (dialplan).

FreeSWITCH POSTs a form: `hostname`, `section`, `tag_name`, `key_name`,
`key_value`, then the request's event headers (see the xml_curl captures).
Whatever we cannot or will not answer gets FreeSWITCH's "not found" document,
which makes it fall back to its static configuration; the product's static
configuration has no users and no routes, so that fails closed.

Lookups cross tenants only through global tables (a tenant's SIP domain, the
number pool); once the tenant is known, everything else is read under its
row-level security. Both answers are one statement each on a driver connection
(`seat_by_sip_address`, `dialplan_route`: SQL functions that set the tenant
themselves), since every REGISTER and every call asks.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.channels.voice import numbers
from backend.channels.voice.admission import CallAdmission, CallAttempt
from backend.channels.voice.legs import (
    VAR_AGENT,
    VAR_CALL,
    VAR_DID,
    VAR_DIRECTION,
    VAR_IVR_FLOW,
    VAR_IVR_FLOW_VERSION,
    VAR_NODE,
    VAR_NUMBER,
    VAR_QUEUE,
    VAR_REFUSAL,
    VAR_SEAT,
    VAR_TENANT,
    VAR_USER,
    as_uuid,
    e164,
)
from backend.channels.voice.nodes import KnownNode, NodeAddressBook
from backend.channels.voice.xml_documents import NOT_FOUND, dialplan, directory_user, switch_text
from backend.db.engine import driver_connection
from backend.lib.problems import InvalidInput

log = structlog.get_logger("voice.xml_curl")

SEAT_CONTEXT = "seats"
"""The dialplan context of calls placed by seats (`user_context`); FreeSWITCH's static dialplan has none."""
MAX_FIELDS = 2000
_SIP_USER = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CONTEXT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")


def _unquote(raw: str) -> str:
    """What `parse_qsl` makes of one name or value: `+` is a space, `%XX` a byte (UTF-8, invalid ones replaced)."""
    if "%" not in raw and "+" not in raw:
        return raw
    return unquote(raw.replace("+", " "), errors="replace")


@dataclass(frozen=True, slots=True)
class XmlCurlForm:
    """The fields of one mod_xml_curl request; the first occurrence of a name wins.

    FreeSWITCH writes its own fields (`hostname`, `section`, ...) first and URL-encodes every
    value, so nothing a caller controls can stand in for them.
    """

    raw: Mapping[str, str]
    """Each field's value as sent, still URL-encoded: a dialplan request carries some 160 fields (every channel
    variable) and the handlers read a dozen, so values are decoded when read (decoding them all cost about 0.12 ms
    of CPU a request)."""

    def get(self, name: str) -> str | None:
        """A field's value, or None when absent or empty."""
        value = self.raw.get(name)
        return _unquote(value) if value else None

    @property
    def section(self) -> str:
        """`directory`, `dialplan`, `configuration`, ..."""
        return self.get("section") or ""

    @property
    def hostname(self) -> str | None:
        """The node's switchname."""
        return self.get("hostname")


def parse_form(body: bytes) -> XmlCurlForm:
    """Read the urlencoded body mod_xml_curl sends (`,` left unencoded, spaces as `%20`), as `parse_qsl` would with
    blank values kept, decoding only the names."""
    try:
        decoded = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidInput.field("body", "is not an urlencoded form (mod_xml_curl encodes every byte)") from exc
    if decoded.count("&") + 1 > MAX_FIELDS:
        raise InvalidInput.field("body", f"has more than {MAX_FIELDS} fields")
    fields: dict[str, str] = {}
    for pair in decoded.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            fields.setdefault(_unquote(name), value)
    if "section" not in fields:
        raise InvalidInput.field("section", "is required (this is not a mod_xml_curl request)")
    return XmlCurlForm(fields)


@dataclass(frozen=True, slots=True)
class DialplanRoute:
    """What `dialplan_route` read for one new call."""

    node_accepting: bool
    """The node is up and not draining, as of this statement."""
    tenant_id: uuid.UUID | None
    """The number's tenant (inbound) or the seat's (outbound), if it exists; None for a free or unknown number."""
    tenant_status: str | None
    sip_domain: str | None
    number_id: uuid.UUID | None
    queue_id: uuid.UUID | None
    ivr_flow_id: uuid.UUID | None
    queue_name: str | None
    ivr_flow_version: int | None
    """The flow's published version (migration 0022): the one the call starts on. None when it has none."""


_DIALPLAN_ROUTE = "SELECT * FROM dialplan_route($1, $2, $3)"


async def dialplan_route(
    engine: AsyncEngine, node_id: uuid.UUID, did: str | None, tenant_id: uuid.UUID | None
) -> DialplanRoute:
    """The node's health and the call's tenant, number, queue and flow version in one statement (0014, 0022).

    With `did`, the tenant is the number's, whatever `tenant_id` says; without, it is `tenant_id`'s.
    """
    async with driver_connection(engine) as connection:
        row = await connection.fetchrow(_DIALPLAN_ROUTE, node_id, did, tenant_id)
    return DialplanRoute(*row)


def _refusal(context: str, reason: str, cause: str, tenant_id: uuid.UUID | None = None) -> bytes:
    """An extension that refuses the call with a hangup cause (mod_sofia turns it into the SIP status)."""
    actions = [("set", f"{VAR_TENANT}={tenant_id}")] if tenant_id else []
    actions += [("set", f"{VAR_REFUSAL}={reason}"), ("hangup", cause)]
    return dialplan(context, "cc_refused", actions)


class XmlCurl:
    """Answers the directory and dialplan requests of the switch nodes."""

    def __init__(
        self,
        nodes: NodeAddressBook,
        admission: CallAdmission,
        call_control_address: str,
        engine: AsyncEngine,
    ) -> None:
        if not _ADDRESS.fullmatch(call_control_address):
            raise ValueError(f"the call-control address must be host:port, not {call_control_address!r}")
        self.nodes = nodes
        self.admission = admission
        self.call_control = call_control_address
        self.engine = engine

    # --- directory ----------------------------------------------------------------------------

    async def directory(self, form: XmlCurlForm, source: str) -> bytes:
        """A seat of a tenant's SIP domain: its digest `a1-hash` when authenticating, and its variables.

        Asked on every REGISTER and every call a phone places, so it reads without a transaction: the
        tenant, the seat and the caller id number in one statement.
        """
        if form.section != "directory":
            log.warning("xml_curl_wrong_section", wanted="directory", section=form.section[:40])
            return NOT_FOUND
        user = form.get("user")
        domain = form.get("domain") or (form.get("key_value") if form.get("key_name") == "name" else None)
        if form.get("purpose") or not user or not domain:
            return NOT_FOUND  # gateways, network lists, domain-only lookups: FreeSWITCH's own configuration
        node = await self.nodes.identify(source, form.hostname)
        if node is None:
            log.warning("xml_curl_unknown_node", source=source, hostname=(form.hostname or "")[:64])
            return NOT_FOUND
        if not _SIP_USER.fullmatch(user):
            log.info("directory_bad_user", node=node.name, user=user[:80])
            return NOT_FOUND
        async with driver_connection(self.engine) as connection:
            lookup = await numbers.seat_with_first_number(connection, domain, user)
        if lookup is None:
            log.info("directory_unknown_domain", node=node.name, domain=domain[:255], user=user)
            return NOT_FOUND
        found, outbound = lookup
        tenant_id = str(found.tenant_id)
        if found.tenant_status == "suspended":
            log.info("directory_tenant_suspended", node=node.name, tenant_id=tenant_id, user=user)
            return NOT_FOUND
        seat = found.seat
        if seat is None or seat.user_status == "disabled":
            log.info("directory_unknown_user", node=node.name, tenant_id=tenant_id, user=user)
            return NOT_FOUND
        action = form.get("action")
        # The a1-hash is as good as the password for SIP digest: only the authentication lookup gets it.
        params = [("a1-hash", seat.sip_a1_hash)] if action == "sip_auth" else []
        variables = [
            ("user_context", SEAT_CONTEXT),
            (VAR_TENANT, tenant_id),
            (VAR_USER, str(seat.user_id)),
            (VAR_SEAT, str(seat.seat_id)),
            ("effective_caller_id_name", switch_text(seat.user_name) or seat.sip_username),
            ("effective_caller_id_number", seat.sip_username),
        ]
        if outbound:
            variables += [("outbound_caller_id_number", outbound)]
        log.debug("directory_user", node=node.name, tenant_id=tenant_id, user=user, action=action)
        return directory_user(found.sip_domain, seat.sip_username, params=params, variables=variables)

    # --- dialplan -----------------------------------------------------------------------------

    async def dialplan(self, form: XmlCurlForm, source: str) -> bytes:
        """Where a new call goes: a tenant's number or seat hands it to call control; anything else is refused.

        Asked for every new call, so it reads without a transaction: the node's health, the tenant, the number and
        its queue in one statement (`dialplan_route`).
        """
        if form.section != "dialplan":
            log.warning("xml_curl_wrong_section", wanted="dialplan", section=form.section[:40])
            return NOT_FOUND
        leg = as_uuid(form.get("Unique-ID") or form.get("Caller-Unique-ID"))
        if leg is None:
            raise InvalidInput.field("Unique-ID", "is required and must be a UUID")
        context = form.get("Hunt-Context") or form.get("Caller-Context") or "default"
        if not _CONTEXT.fullmatch(context):
            raise InvalidInput.field("Caller-Context", "is not a dialplan context name")
        node = await self.nodes.identify(source, form.hostname)
        if node is None:
            log.warning("xml_curl_unknown_node", source=source, hostname=(form.hostname or "")[:64], leg=str(leg))
            return _refusal(context, "unknown_node", "NORMAL_TEMPORARY_FAILURE")
        destination = form.get("Hunt-Destination-Number") or form.get("Caller-Destination-Number") or ""
        caller_number = form.get("Hunt-Caller-ID-Number") or form.get("Caller-Caller-ID-Number") or ""
        caller_name = form.get("Hunt-Caller-ID-Name") or form.get("Caller-Caller-ID-Name") or ""
        from_seat = bool(form.get(f"variable_{VAR_TENANT}"))
        did = None if from_seat else e164(destination)
        seat_tenant = as_uuid(form.get(f"variable_{VAR_TENANT}")) if from_seat else None
        route = await dialplan_route(self.engine, node.id, did, seat_tenant)
        if not route.node_accepting:
            log.warning("dialplan_node_not_accepting", node=node.name, leg=str(leg))
            return _refusal(context, "node_unavailable", "NORMAL_TEMPORARY_FAILURE")
        if from_seat:
            return await self._from_seat(route, form, node, leg, context, caller_number, destination)
        return await self._to_number(route, node, leg, context, caller_number, caller_name, destination, did)

    async def _to_number(
        self,
        route: DialplanRoute,
        node: KnownNode,
        leg: uuid.UUID,
        context: str,
        caller_number: str,
        caller_name: str,
        destination: str,
        did: str | None,
    ) -> bytes:
        tenant_id = route.tenant_id
        if did is None or route.number_id is None or tenant_id is None:
            log.info("dialplan_unknown_number", node=node.name, leg=str(leg), destination=destination[:64])
            return _refusal(context, "unknown_number", "UNALLOCATED_NUMBER")
        if route.tenant_status == "suspended":
            log.info("dialplan_tenant_suspended", node=node.name, leg=str(leg), tenant_id=str(tenant_id))
            return _refusal(context, "tenant_suspended", "INCOMING_CALL_BARRED", tenant_id)
        admission = await self.admission.check(CallAttempt(tenant_id, "inbound", caller_number, did, did))
        if not admission.admitted:
            log.info("dialplan_not_admitted", leg=str(leg), tenant_id=str(tenant_id), reason=admission.reason)
            return _refusal(context, "not_admitted", admission.hangup_cause, tenant_id)
        if route.queue_id is None and route.ivr_flow_id is None:
            log.info("dialplan_number_without_target", leg=str(leg), tenant_id=str(tenant_id), did=did)
            return _refusal(context, "no_target", "NO_ROUTE_DESTINATION", tenant_id)
        actions = [
            ("export", f"{VAR_TENANT}={tenant_id}"),
            ("export", f"{VAR_CALL}={leg}"),
            ("export", f"{VAR_DIRECTION}=inbound"),
            ("export", f"{VAR_DID}={did}"),
            ("export", f"{VAR_NUMBER}={route.number_id}"),
        ]
        shown = switch_text(caller_name) or switch_text(caller_number)
        if route.ivr_flow_id is not None:
            actions.append(("export", f"{VAR_IVR_FLOW}={route.ivr_flow_id}"))
            if route.ivr_flow_version is not None:
                actions.append(("export", f"{VAR_IVR_FLOW_VERSION}={route.ivr_flow_version}"))
        if route.queue_id is not None:
            actions.append(("export", f"{VAR_QUEUE}={route.queue_id}"))
            if route.queue_name is not None:
                # What the agent's phone shows: the queue the call came through, then the caller.
                shown = switch_text(f"{switch_text(route.queue_name, 40)}: {shown}")
        actions.append(("set", f"{VAR_NODE}={node.id}"))
        if shown:
            actions.append(("set", f"effective_caller_id_name={shown}"))
        # Call control runs the call. If its process dies, the running application finishes and the `socket`
        # application returns (mod_event_socket); the second `socket` hands the call to another process,
        # which resumes it from its record (docs/decisions.md, "Call control").
        actions.append(("socket", f"{self.call_control} async full"))
        actions.append(("socket", f"{self.call_control} async full"))
        log.info("dialplan_inbound", node=node.name, leg=str(leg), tenant_id=str(tenant_id), did=did)
        return dialplan(context, "cc_inbound", actions)

    async def _from_seat(
        self,
        route: DialplanRoute,
        form: XmlCurlForm,
        node: KnownNode,
        leg: uuid.UUID,
        context: str,
        caller_number: str,
        destination: str,
    ) -> bytes:
        tenant_id = route.tenant_id
        domain = (form.get("variable_domain_name") or "").lower()
        # The variables come from our own directory answer; a seat's domain must agree with them.
        if tenant_id is None or domain != route.sip_domain:
            log.warning("dialplan_seat_mismatch", node=node.name, leg=str(leg), domain=domain[:255])
            return _refusal(context, "seat_mismatch", "CALL_REJECTED")
        if route.tenant_status == "suspended":
            log.info("dialplan_tenant_suspended", node=node.name, leg=str(leg), tenant_id=str(tenant_id))
            return _refusal(context, "tenant_suspended", "OUTGOING_CALL_BARRED", tenant_id)
        admission = await self.admission.check(CallAttempt(tenant_id, "outbound", caller_number, destination))
        if not admission.admitted:
            log.info("dialplan_not_admitted", leg=str(leg), tenant_id=str(tenant_id), reason=admission.reason)
            return _refusal(context, "not_admitted", admission.hangup_cause, tenant_id)
        user_id = as_uuid(form.get(f"variable_{VAR_USER}"))
        actions = [
            ("export", f"{VAR_TENANT}={tenant_id}"),
            ("export", f"{VAR_CALL}={leg}"),
            ("export", f"{VAR_DIRECTION}=outbound"),
        ]
        if user_id is not None:
            actions.append(("export", f"{VAR_AGENT}={user_id}"))
        actions += [("set", f"{VAR_NODE}={node.id}"), ("socket", f"{self.call_control} async full")]
        log.info("dialplan_outbound", node=node.name, leg=str(leg), tenant_id=str(tenant_id))
        return dialplan(context, "cc_outbound", actions)
