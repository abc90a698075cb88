"""The XML documents mod_xml_curl expects back: a directory user, a dialplan extension, or "not found".

Documents are built as element trees and serialised by ElementTree, so every
value is XML-escaped. Values a tenant or a caller controls (names, labels) are
additionally stripped of the characters FreeSWITCH itself interprets inside
variable values and application arguments: `${...}` and `$${...}` are expanded
(recursively, and `${api(...)}` runs an API command, see switch_channel.c
`switch_channel_expand_variables_check`), `{...}`/`[...]` carry per-leg
variables in dial strings, `\\` escapes, `^^` changes the separator, and quotes
end SIP display names. What remains is plain text.
"""

from __future__ import annotations

import re
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
CONTENT_TYPE = "text/xml"

# FreeSWITCH's own "no answer from this binding" document (switch_xml.c `switch_xml_locate`): the
# lookup falls through to the next binding and then to the static configuration. Byte for byte
# what FreeSWITCH's documentation and the captures use.
NOT_FOUND = (
    XML_DECLARATION + '<document type="freeswitch/xml">\n'
    '  <section name="result">\n'
    '    <result status="not found"/>\n'
    "  </section>\n"
    "</document>\n"
).encode()

# FreeSWITCH's standard dial string: the contact(s) the user registered, on the profile that holds them.
DIAL_STRING = (
    "{^^:sip_invite_domain=${dialed_domain}:presence_id=${dialed_user}@${dialed_domain}}"
    "${sofia_contact(*/${dialed_user}@${dialed_domain})}"
)

_SWITCH_SPECIAL = re.compile(r"[${}\[\]\\^|`'\"<>]")
_SPACES = re.compile(r"\s+")


def switch_text(value: str, max_length: int = 80) -> str:
    """Tenant- or caller-controlled text made inert for FreeSWITCH: plain printable characters only."""
    value = _SPACES.sub(" ", unicodedata.normalize("NFC", value))
    value = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C")
    value = _SWITCH_SPECIAL.sub("", value)
    return _SPACES.sub(" ", value).strip()[:max_length]


def _render(document: ET.Element) -> bytes:
    ET.indent(document, space="  ")
    return (XML_DECLARATION + ET.tostring(document, encoding="unicode") + "\n").encode()


def _document(section: str, description: str | None = None) -> tuple[ET.Element, ET.Element]:
    document = ET.Element("document", {"type": "freeswitch/xml"})
    attributes = {"name": section}
    if description:
        attributes["description"] = description
    return document, ET.SubElement(document, "section", attributes)


def directory_user(
    domain: str,
    user_id: str,
    *,
    params: Sequence[tuple[str, str]],
    variables: Sequence[tuple[str, str]],
    domain_params: Sequence[tuple[str, str]] = (("dial-string", DIAL_STRING),),
) -> bytes:
    """One user of one domain, in the layout FreeSWITCH's static directory uses (domain/groups/group/users/user)."""
    document, section = _document("directory")
    domain_element = ET.SubElement(section, "domain", {"name": domain})
    domain_param_list = ET.SubElement(domain_element, "params")
    for name, value in domain_params:
        ET.SubElement(domain_param_list, "param", {"name": name, "value": value})
    users = ET.SubElement(ET.SubElement(ET.SubElement(domain_element, "groups"), "group", {"name": "default"}), "users")
    user = ET.SubElement(users, "user", {"id": user_id})
    param_list = ET.SubElement(user, "params")
    for name, value in params:
        ET.SubElement(param_list, "param", {"name": name, "value": value})
    variable_list = ET.SubElement(user, "variables")
    for name, value in variables:
        ET.SubElement(variable_list, "variable", {"name": name, "value": value})
    return _render(document)


def dialplan(context: str, extension: str, actions: Iterable[tuple[str, str]]) -> bytes:
    """A context holding one extension whose single condition always holds, running `actions` in order."""
    document, section = _document("dialplan", "contact center")
    context_element = ET.SubElement(section, "context", {"name": context})
    condition = ET.SubElement(ET.SubElement(context_element, "extension", {"name": extension}), "condition")
    for application, data in actions:
        attributes = {"application": application}
        if data:
            attributes["data"] = data
        ET.SubElement(condition, "action", attributes)
    return _render(document)
