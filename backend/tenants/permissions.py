"""The permission catalogue (`resource:action`) and the built-in roles made of it."""

from __future__ import annotations

from typing import Final

# Every permission a route may declare. Later capabilities add theirs here.
PERMISSIONS: Final[dict[str, str]] = {
    "tenant:read": "Read the tenant's settings",
    "tenant:write": "Change the tenant's settings (name, time zone, mandatory MFA)",
    "users:read": "List and read users",
    "users:write": "Invite, change and deactivate users",
    "owners:manage": "Make users owners or take the owner role away",
    "roles:read": "List roles and the permission catalogue",
    "roles:write": "Create, change and delete custom roles",
    "teams:read": "List teams and their members",
    "teams:write": "Create, change and delete teams and memberships",
    "seats:read": "List seats",
    "seats:write": "Assign, release seats and rotate SIP credentials",
    "api_keys:read": "List API keys",
    "api_keys:write": "Create and revoke API keys",
    "sso:read": "Read the single sign-on configuration",
    "sso:write": "Configure single sign-on",
    "audit:read": "Read the audit log",
    "billing:read": "Read balances and invoices",
    "billing:write": "Change payment settings",
    "customers:read": "Read customer records",
    "customers:read_sensitive": "See customers' phone numbers and e-mails unmasked",
    "customers:write": "Create and change customer records",
    "customers:delete": "Delete and anonymise customer records",
    "customers:import": "Import customers",
    "customers:export": "Export customers",
    "customers:all_units": "Reach the customers of every business unit, not only one's own teams'",
    "customers:configure": "Define the custom fields of customer records",
    "tickets:read": "List and read tickets",
    "tickets:write": "Create tickets, comment, assign and move them through their statuses",
    "tickets:configure": "Set the resolution time (SLA) of each ticket priority",
    "queues:read": "Read queues, skills and routing settings",
    "queues:write": "Change queues, skills and routing settings",
    "reports:read": "Read reports and the wallboard",
    "calls:listen": "Listen to agents' live calls (the caller and agent do not hear the supervisor)",
    "calls:whisper": "Speak to the agent on a live call without the caller hearing",
    "calls:barge": "Join a live call, heard by both caller and agent",
    "calls:outbound": "Place outbound calls (click-to-call), within the tenant's outbound policy",
    "recordings:read": "List and play back call recordings",
    "voicemail:read": "List and play back the voicemail of every box (agents always hear their own)",
    "agent:workspace": "Use the agent workspace: set state, take offers",
}

_SUPERVISOR: Final = frozenset(
    {
        "tenant:read",
        "users:read",
        "roles:read",
        "teams:read",
        "seats:read",
        "customers:read",
        "customers:read_sensitive",
        "customers:write",
        "customers:export",
        "customers:all_units",
        "tickets:read",
        "tickets:write",
        "queues:read",
        "reports:read",
        "calls:listen",
        "calls:whisper",
        "calls:barge",
        "calls:outbound",
        "recordings:read",
        "voicemail:read",
        "agent:workspace",
    }
)
_AGENT: Final = frozenset(
    {
        "tenant:read",
        "users:read",
        "teams:read",
        "customers:read",
        "customers:write",
        "calls:outbound",
        "tickets:read",
        "tickets:write",
        "agent:workspace",
    }
)

BUILTIN_ROLES: Final[dict[str, tuple[str, frozenset[str]]]] = {
    "owner": ("Everything, including other owners", frozenset(PERMISSIONS)),
    "admin": ("Everything but the owner role", frozenset(PERMISSIONS) - {"owners:manage"}),
    "supervisor": ("Supervises agents and queues", _SUPERVISOR),
    "agent": ("Handles calls and chats", _AGENT),
}
OWNER_ROLE: Final = "owner"
