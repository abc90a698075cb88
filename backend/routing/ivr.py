"""IVR flow graphs: the node types a tenant draws, and the checks a graph must pass before it is saved.

A flow is a JSON graph: `start` names the first node, `nodes` maps node ids to
nodes, and nodes point at each other by id (`next`, menu `options`,
`on_failure`, ...). Everything here is pure: no I/O, no database. What a graph
refers to (queues, hours, prompts, agents) is collected by `references` and
checked against the tenant by the service.

Loops are bounded by construction. Any node may declare `max_visits`; a call
entering it once more goes to its `on_exhausted` node instead (or hangs up).
A graph is accepted only if the graph made of the ordinary edges of nodes
without a limit plus the `on_exhausted` edges of nodes with one has no cycle:
then once every limit is spent, the call can only move forward, so every call
ends. This is what "every loop passes a node with a visit limit, and what
happens after it does not loop again" means, and the interpreter's tests check
it on random graphs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
import phonenumbers

from backend.tenants.schemas import Strict

NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="A node's id in the graph")]
VariableName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
AttributeName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]
Language = Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,2}$", examples=["fr-FR"])]
Voice = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,40}$")]
DigitKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9*#]$")]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=60)]
Retries = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Visits = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Label = Annotated[str, msgspec.Meta(max_length=120)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=100)]
_ErrorSink = Callable[[str, str], None]

BUILTIN_VARIABLES = frozenset({"caller_number", "did", "language"})
"""Variables every call has: the caller's number, the number dialled, the current language."""
HANGUP_CAUSES = ("NORMAL_CLEARING", "CALL_REJECTED", "USER_BUSY", "NO_ANSWER")


# --- prompts ----------------------------------------------------------------------------------


class FilePrompt(Strict, tag="file", tag_field="kind"):
    """An uploaded prompt of the tenant, by id."""

    prompt_id: uuid.UUID


class TtsPrompt(Strict, tag="tts", tag_field="kind"):
    """Text spoken by the switch's speech engine; the language and voice default to the call's."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    language: Language | None = None
    voice: Voice | None = None


Prompt = FilePrompt | TtsPrompt


# --- nodes ------------------------------------------------------------------------------------


class NodeBase(Strict, tag_field="type", kw_only=True):
    """What every node may carry: a label for the editor and a visit limit."""

    label: Label = ""
    max_visits: Visits | None = None
    """How often one call may enter this node; beyond it the call goes to `on_exhausted` (or hangs up)."""
    on_exhausted: NodeId | None = None


class PlayNode(NodeBase, tag="play", kw_only=True):
    """Play a prompt, then go on."""

    prompt: Prompt
    next: NodeId


class MenuNode(NodeBase, tag="menu", kw_only=True):
    """Play a prompt and wait for one key; a key not in `options`, or none, replays it up to `max_retries` times."""

    prompt: Prompt
    options: Annotated[dict[DigitKey, NodeId], msgspec.Meta(min_length=1, max_length=12)]
    timeout_seconds: Seconds = 5
    invalid_prompt: Prompt | None = None
    """Played after a key that is not an option."""
    retry_prompt: Prompt | None = None
    """Played after no key at all, before the menu again."""
    max_retries: Retries = 2
    on_failure: NodeId | None = None
    """Where the call goes when the retries are spent (absent: it hangs up)."""


class CollectNode(NodeBase, tag="collect", kw_only=True):
    """Collect digits into a variable (an account number, a PIN), between `min_digits` and `max_digits`."""

    prompt: Prompt
    variable: VariableName
    min_digits: Annotated[int, msgspec.Meta(ge=1, le=32)] = 1
    max_digits: Annotated[int, msgspec.Meta(ge=1, le=32)] = 16
    terminator: Literal["#", "*", ""] = "#"
    timeout_seconds: Seconds = 5
    invalid_prompt: Prompt | None = None
    max_retries: Retries = 2
    next: NodeId
    on_failure: NodeId | None = None


class HoursNode(NodeBase, tag="hours", kw_only=True):
    """Branch on whether business hours are open now (holidays and exceptions included)."""

    business_hours_id: uuid.UUID
    open: NodeId
    closed: NodeId


class BranchCase(Strict, kw_only=True):
    """One test of a branch; the first that holds wins."""

    op: Literal["equals", "not_equals", "in", "prefix", "less_than", "greater_than", "present", "absent"]
    value: Annotated[str, msgspec.Meta(max_length=200)] = ""
    values: Annotated[list[Annotated[str, msgspec.Meta(max_length=200)]], msgspec.Meta(max_length=50)] = []
    next: NodeId


class BranchNode(NodeBase, tag="branch", kw_only=True):
    """Branch on a variable of the call or an attribute of the customer (the customer store's record)."""

    source: Literal["variable", "customer"]
    name: AttributeName
    cases: Annotated[list[BranchCase], msgspec.Meta(min_length=1, max_length=20)]
    default: NodeId


class QueueNode(NodeBase, tag="queue", kw_only=True):
    """Put the call in a queue of the tenant: call control takes it from here."""

    queue_id: uuid.UUID
    priority: Priority | None = None
    attributes: Annotated[
        dict[AttributeName, Annotated[str, msgspec.Meta(max_length=200)]], msgspec.Meta(max_length=20)
    ] = {}
    variables: Annotated[list[VariableName], msgspec.Meta(max_length=20)] = []
    """Variables copied into the interaction's attributes (for routing and the agent's screen)."""


class VoicemailNode(NodeBase, tag="voicemail", kw_only=True):
    """Record a message into a queue's box or an agent's box."""

    queue_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    greeting: Prompt | None = None
    max_seconds: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 120


class CallbackOfferNode(NodeBase, tag="callback_offer", kw_only=True):
    """Offer a callback ("press 1 to be called back"): accepted, the call ends with a callback in the queue."""

    prompt: Prompt
    queue_id: uuid.UUID
    accept_digit: DigitKey = "1"
    timeout_seconds: Seconds = 5
    max_retries: Retries = 1
    number_variable: VariableName | None = None
    """The variable holding the number to call back (absent: the caller's own number)."""
    confirmation: Prompt | None = None
    priority: Priority | None = None
    declined: NodeId
    """Where the call goes when the caller presses another key or nothing."""


class TransferNode(NodeBase, tag="transfer", kw_only=True):
    """Hand the call to a queue, an agent or an external number (outbound rules apply at call time)."""

    target: Literal["queue", "agent", "external"]
    queue_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    number: Annotated[str, msgspec.Meta(max_length=32)] | None = None


class SetLanguageNode(NodeBase, tag="set_language", kw_only=True):
    """Speak this language (and voice) from here on; copied to the interaction when it is queued."""

    language: Language
    voice: Voice | None = None
    next: NodeId


class HangupNode(NodeBase, tag="hangup", kw_only=True):
    """End the call, after an optional prompt."""

    prompt: Prompt | None = None
    cause: Literal["NORMAL_CLEARING", "CALL_REJECTED", "USER_BUSY", "NO_ANSWER"] = "NORMAL_CLEARING"


Node = (
    PlayNode
    | MenuNode
    | CollectNode
    | HoursNode
    | BranchNode
    | QueueNode
    | VoicemailNode
    | CallbackOfferNode
    | TransferNode
    | SetLanguageNode
    | HangupNode
)
TERMINAL_NODES = (QueueNode, VoicemailNode, TransferNode, HangupNode)


class FlowGraph(Strict):
    """A flow: the first node and every node by id."""

    start: NodeId
    nodes: Annotated[dict[NodeId, Node], msgspec.Meta(min_length=1)]


# --- edges and references ---------------------------------------------------------------------


def edges(node: Node) -> Iterator[tuple[str, str]]:
    """The node's ordinary edges as (field path, target), without `on_exhausted`."""
    if isinstance(node, PlayNode | CollectNode | SetLanguageNode):
        yield "next", node.next
    if isinstance(node, MenuNode):
        for key, target in node.options.items():
            yield f"options.{key}", target
    if isinstance(node, MenuNode | CollectNode) and node.on_failure is not None:
        yield "on_failure", node.on_failure
    if isinstance(node, HoursNode):
        yield "open", node.open
        yield "closed", node.closed
    if isinstance(node, BranchNode):
        for index, case in enumerate(node.cases):
            yield f"cases[{index}].next", case.next
        yield "default", node.default
    if isinstance(node, CallbackOfferNode):
        yield "declined", node.declined


def all_edges(node: Node) -> Iterator[tuple[str, str]]:
    """Every edge of the node, `on_exhausted` included."""
    yield from edges(node)
    if node.on_exhausted is not None:
        yield "on_exhausted", node.on_exhausted


def prompts_of(node: Node) -> Iterator[tuple[str, Prompt]]:
    """The node's prompts as (field path, prompt)."""
    for name in ("prompt", "invalid_prompt", "retry_prompt", "greeting", "confirmation"):
        prompt = getattr(node, name, None)
        if prompt is not None:
            yield name, prompt


@dataclass
class FlowReferences:
    """What a graph refers to outside itself, each with the field paths that name it."""

    queues: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    hours: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    prompts: dict[uuid.UUID, list[str]] = field(default_factory=dict)
    agents: dict[uuid.UUID, list[str]] = field(default_factory=dict)


def references(graph: FlowGraph, prefix: str = "graph") -> FlowReferences:
    """Collect the queues, business hours, prompts and agents the graph names."""
    found = FlowReferences()
    for node_id, node in graph.nodes.items():
        path = f"{prefix}.nodes.{node_id}"
        for name, prompt in prompts_of(node):
            if isinstance(prompt, FilePrompt):
                found.prompts.setdefault(prompt.prompt_id, []).append(f"{path}.{name}.prompt_id")
        for name in ("queue_id", "agent_id", "business_hours_id"):
            value = getattr(node, name, None)
            if value is None:
                continue
            bucket = {"queue_id": found.queues, "agent_id": found.agents, "business_hours_id": found.hours}[name]
            bucket.setdefault(value, []).append(f"{path}.{name}")
    return found


# --- structural checks ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """The size limits a graph is checked against (from settings)."""

    max_nodes: int
    max_bytes: int
    max_visits: int
    max_retries: int
    max_voicemail_seconds: int


_NUMBER = re.compile(r"^-?[0-9]+(?:\.[0-9]+)?$")


def check_graph(graph: FlowGraph, limits: GraphLimits, prefix: str = "graph") -> list[dict[str, str]]:
    """Every structural error of the graph as field errors (empty: the graph is sound)."""
    errors: list[dict[str, str]] = []

    def error(path: str, message: str) -> None:
        errors.append({"field": path, "message": message})

    if len(graph.nodes) > limits.max_nodes:
        error(f"{prefix}.nodes", f"at most {limits.max_nodes} nodes")
        return errors
    size = len(msgspec.json.encode(graph))
    if size > limits.max_bytes:
        error(prefix, f"is {size} bytes; at most {limits.max_bytes}")
        return errors
    if graph.start not in graph.nodes:
        error(f"{prefix}.start", "is not a node of the graph")
    collected = {n.variable for n in graph.nodes.values() if isinstance(n, CollectNode)}
    known_variables = collected | BUILTIN_VARIABLES
    for node_id, node in graph.nodes.items():
        path = f"{prefix}.nodes.{node_id}"
        for name, target in all_edges(node):
            if target not in graph.nodes:
                error(f"{path}.{name}", f"points at {target!r}, which is not a node of the graph")
            elif target == node_id and name == "on_exhausted":
                error(f"{path}.{name}", "cannot point at the node itself")
        _check_node(node, path, limits, known_variables, error)
    if errors:
        return errors
    reachable = _reachable(graph)
    for node_id in graph.nodes:
        if node_id not in reachable:
            error(f"{prefix}.nodes.{node_id}", "is not reachable from the start")
    loop = _unbounded_loop(graph)
    if loop is not None:
        limited = [n for n in loop[:-1] if graph.nodes[n].max_visits is not None]
        shown = " → ".join(loop)
        if limited:
            error(
                f"{prefix}.nodes.{limited[0]}.on_exhausted",
                f"once max_visits is spent the call still goes round {shown}: point on_exhausted out of the loop",
            )
        else:
            error(f"{prefix}.nodes.{loop[0]}.max_visits", f"the loop {shown} has no node with max_visits")
    return errors


def _check_node(
    node: Node,
    path: str,
    limits: GraphLimits,
    known_variables: set[str],
    error: _ErrorSink,
) -> None:
    if node.on_exhausted is not None and node.max_visits is None:
        error(f"{path}.on_exhausted", "is only allowed with max_visits")
    if node.max_visits is not None and node.max_visits > limits.max_visits:
        error(f"{path}.max_visits", f"at most {limits.max_visits}")
    retries = getattr(node, "max_retries", None)
    if retries is not None and retries > limits.max_retries:
        error(f"{path}.max_retries", f"at most {limits.max_retries}")
    if isinstance(node, CollectNode) and node.min_digits > node.max_digits:
        error(f"{path}.min_digits", "must not exceed max_digits")
    if isinstance(node, BranchNode):
        if node.source == "variable" and node.name not in known_variables:
            error(f"{path}.name", "is not a variable any collect node sets (nor caller_number, did, language)")
        for index, case in enumerate(node.cases):
            if case.op == "in" and not case.values:
                error(f"{path}.cases[{index}].values", "is required for op in")
            if case.op in ("less_than", "greater_than") and not _NUMBER.fullmatch(case.value):
                error(f"{path}.cases[{index}].value", "must be a number for a comparison")
    if isinstance(node, QueueNode):
        for index, name in enumerate(node.variables):
            if name not in known_variables:
                error(f"{path}.variables[{index}]", "is not a variable of the flow")
    if isinstance(node, CallbackOfferNode) and node.number_variable not in (None, *known_variables):
        error(f"{path}.number_variable", "is not a variable of the flow")
    if isinstance(node, VoicemailNode):
        if (node.queue_id is None) == (node.agent_id is None):
            error(f"{path}.queue_id", "exactly one of queue_id and agent_id names the box")
        if node.max_seconds > limits.max_voicemail_seconds:
            error(f"{path}.max_seconds", f"at most {limits.max_voicemail_seconds}")
    if isinstance(node, TransferNode):
        _check_transfer(node, path, error)


def _check_transfer(node: TransferNode, path: str, error: _ErrorSink) -> None:
    """Exactly the field the target needs; an external number valid, and normalised to E.164 in place."""
    wanted = {"queue": "queue_id", "agent": "agent_id", "external": "number"}[node.target]
    for name in ("queue_id", "agent_id", "number"):
        present = getattr(node, name) is not None
        if name == wanted and not present:
            error(f"{path}.{name}", f"is required when target is {node.target}")
        elif name != wanted and present:
            error(f"{path}.{name}", f"is not used when target is {node.target}")
    if node.number is not None:
        try:
            parsed = phonenumbers.parse(node.number, None)
        except phonenumbers.NumberParseException:
            parsed = None
        if parsed is None or not phonenumbers.is_valid_number(parsed):
            error(f"{path}.number", "is not a valid phone number in international format (+...)")
        else:
            node.number = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _reachable(graph: FlowGraph) -> set[str]:
    seen = {graph.start}
    frontier = [graph.start]
    while frontier:
        for _, target in all_edges(graph.nodes[frontier.pop()]):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def bounding_edges(graph: FlowGraph, node_id: str) -> list[str]:
    """The edges that still apply once every visit limit is spent: a limited node only leaves by `on_exhausted`."""
    node = graph.nodes[node_id]
    if node.max_visits is not None:
        return [node.on_exhausted] if node.on_exhausted is not None else []
    return [target for _, target in edges(node)]


def _unbounded_loop(graph: FlowGraph) -> list[str] | None:
    """A cycle of the bounding graph (`[a, b, ..., a]`), or None when every call must end."""
    colour: dict[str, int] = {}
    for root in graph.nodes:
        if colour.get(root):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(bounding_edges(graph, root)))]
        path = [root]
        colour[root] = 1
        while stack:
            current, following = stack[-1]
            step = next(following, None)
            if step is None:
                colour[current] = 2
                stack.pop()
                path.pop()
                continue
            state = colour.get(step, 0)
            if state == 1:
                return [*path[path.index(step) :], step]
            if state == 0:
                colour[step] = 1
                stack.append((step, iter(bounding_edges(graph, step))))
                path.append(step)
    return None
