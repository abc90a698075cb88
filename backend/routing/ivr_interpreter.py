"""The IVR flow interpreter: a pure state machine, no I/O, that call control drives.

Call control loads the version a call is pinned to, makes a `FlowInterpreter`
of it, and then:

    step = interpreter.start({"caller_number": "+33...", "did": "+33..."})
    while not step.finished:
        event = <carry out step.action on the switch, or ask routing/customers>
        step = interpreter.advance(step.state, event)

Each `Step` holds the next `Action` (play, play and collect digits, ask
whether hours are open, look the customer up, or a terminal action: enqueue,
voicemail, callback, transfer, hang up) and the new `CallState`. The state is
a msgspec Struct, plain data, so call control may keep it in Redis or the
interaction's timeline and resume the call in another process. `trace` lists
the nodes entered during the step, for `ivr_step` timeline events.

Visit counters and retries bound every loop (see `backend.routing.ivr`);
`max_steps` is a last safety net for graphs that were never validated.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Literal

import msgspec

from backend.routing.ivr import (
    BranchCase,
    BranchNode,
    CallbackOfferNode,
    CollectNode,
    FlowGraph,
    HangupNode,
    HoursNode,
    MenuNode,
    Node,
    PlayNode,
    Prompt,
    QueueNode,
    SetLanguageNode,
    TransferNode,
    TtsPrompt,
    VoicemailNode,
)

Waiting = Literal["played", "digits", "hours", "customer", "nothing"]


class InterpreterError(Exception):
    """Call control asked something the flow cannot answer (a bug of the caller, never of the caller's keys)."""


class UnexpectedEvent(InterpreterError):
    """The event does not answer the action the state is waiting on."""


class FlowFinished(InterpreterError):
    """The call already left the flow."""


# --- what the interpreter is told -------------------------------------------------------------


class PlaybackDone(msgspec.Struct, frozen=True, tag="played"):
    """The prompts of a `Play` were played to the end (or interrupted by a key: ignored)."""


class DigitsEntered(msgspec.Struct, frozen=True, tag="digits"):
    """Keys the caller pressed in answer to a `Collect` (the terminator may be included)."""

    digits: str


class NoInput(msgspec.Struct, frozen=True, tag="no_input"):
    """A `Collect` timed out with no key."""


class HoursAnswer(msgspec.Struct, frozen=True, tag="hours"):
    """Whether the business hours of a `CheckHours` are open now."""

    open: bool


class CustomerAnswer(msgspec.Struct, frozen=True, tag="customer"):
    """The caller's customer attributes (empty when no customer matched)."""

    attributes: dict[str, str]


class CallerHungUp(msgspec.Struct, frozen=True, tag="hangup"):
    """The caller left, whatever the flow was waiting for."""


Event = PlaybackDone | DigitsEntered | NoInput | HoursAnswer | CustomerAnswer | CallerHungUp


# --- what the interpreter asks ----------------------------------------------------------------


class Speech(msgspec.Struct, frozen=True):
    """A prompt with the language and voice it is to be spoken in (for TTS; a file ignores them)."""

    prompt: Prompt
    language: str | None
    voice: str | None


class Play(msgspec.Struct, frozen=True, tag="play"):
    """Play these prompts, then send `PlaybackDone`."""

    speech: tuple[Speech, ...]


class Collect(msgspec.Struct, frozen=True, tag="collect"):
    """Play these prompts and collect keys: send `DigitsEntered`, or `NoInput` after `timeout_ms` of silence."""

    speech: tuple[Speech, ...]
    min_digits: int
    max_digits: int
    timeout_ms: int
    terminators: str


class CheckHours(msgspec.Struct, frozen=True, tag="check_hours"):
    """Say whether these business hours are open now: send `HoursAnswer`."""

    business_hours_id: uuid.UUID


class LookUpCustomer(msgspec.Struct, frozen=True, tag="look_up_customer"):
    """Find the caller in the customer store: send `CustomerAnswer`."""


class Enqueue(msgspec.Struct, frozen=True, tag="enqueue"):
    """Terminal: create the interaction in this queue (routing's engine) and hold the caller."""

    queue_id: uuid.UUID
    priority: int | None
    attributes: dict[str, str]
    language: str | None


class Voicemail(msgspec.Struct, frozen=True, tag="voicemail"):
    """Terminal: play the greeting (if any) and record a message into the queue's or agent's box."""

    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    greeting: Speech | None
    max_seconds: int


class RequestCallback(msgspec.Struct, frozen=True, tag="callback"):
    """Terminal: the caller accepted a callback from this queue; play the confirmation, then hang up."""

    queue_id: uuid.UUID
    number: str | None
    """The number to call back; None: the caller's own."""
    priority: int | None
    confirmation: Speech | None


class Transfer(msgspec.Struct, frozen=True, tag="transfer"):
    """Terminal: hand the call to a queue, an agent or an external number."""

    target: Literal["queue", "agent", "external"]
    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    number: str | None


HangupReason = Literal["flow", "retries_exhausted", "visits_exhausted", "step_limit"]


class Hangup(msgspec.Struct, frozen=True, tag="hangup"):
    """Terminal: play the prompt (if any) and hang up with the cause."""

    speech: Speech | None
    cause: str
    reason: HangupReason


class CallerGone(msgspec.Struct, frozen=True, tag="caller_gone"):
    """Terminal: the caller hung up at `node`; nothing is left to do but record it."""

    node: str


Action = (
    Play
    | Collect
    | CheckHours
    | LookUpCustomer
    | Enqueue
    | Voicemail
    | RequestCallback
    | Transfer
    | Hangup
    | CallerGone
)
TERMINAL_ACTIONS = (Enqueue, Voicemail, RequestCallback, Transfer, Hangup, CallerGone)


# --- the state of one call --------------------------------------------------------------------


class CallState(msgspec.Struct, kw_only=True):
    """Where one call is in its pinned flow version; plain data, safe to store and resume from."""

    flow_id: uuid.UUID
    version: int
    node: str
    waiting: Waiting = "nothing"
    attempt: int = 0
    """Retries used at the current node."""
    visits: dict[str, int] = msgspec.field(default_factory=dict)
    steps: int = 0
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    language: str | None = None
    voice: str | None = None
    customer: dict[str, str] | None = None
    """The customer's attributes once looked up (None: not asked yet)."""
    finished: bool = False


class Step(msgspec.Struct, frozen=True):
    """What to do next, the state to keep, and the nodes entered on the way."""

    state: CallState
    action: Action
    trace: tuple[str, ...]

    @property
    def finished(self) -> bool:
        """Whether the call has left the flow (the action is terminal)."""
        return isinstance(self.action, TERMINAL_ACTIONS)


def _copy(state: CallState) -> CallState:
    return msgspec.structs.replace(
        state,
        visits=dict(state.visits),
        variables=dict(state.variables),
        customer=None if state.customer is None else dict(state.customer),
    )


def _number(value: str) -> Decimal | None:
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


def case_holds(case: BranchCase, value: str | None) -> bool:
    """Whether a branch case holds for a value (None: the variable or attribute is absent)."""
    if case.op == "present":
        return bool(value)
    if case.op == "absent":
        return not value
    if value is None:
        return case.op == "not_equals"
    if case.op == "equals":
        return value == case.value
    if case.op == "not_equals":
        return value != case.value
    if case.op == "in":
        return value in case.values
    if case.op == "prefix":
        return value.startswith(case.value)
    left, right = _number(value), _number(case.value)
    if left is None or right is None:
        return False
    return left < right if case.op == "less_than" else left > right


class FlowInterpreter:
    """Runs one published version of a flow for any number of calls (it keeps no per-call state)."""

    def __init__(self, flow_id: uuid.UUID, version: int, graph: FlowGraph, *, max_steps: int) -> None:
        self.flow_id = flow_id
        self.version = version
        self.graph = graph
        self.max_steps = max_steps

    # --- public -------------------------------------------------------------------------------

    def start(self, variables: Mapping[str, str] | None = None, *, language: str | None = None) -> Step:
        """A new call enters the flow at its start node (`caller_number` and `did` among the variables)."""
        state = CallState(
            flow_id=self.flow_id,
            version=self.version,
            node=self.graph.start,
            variables=dict(variables or {}),
            language=language,
        )
        if language:
            state.variables["language"] = language
        return self._enter(state, self.graph.start, [])

    def advance(self, state: CallState, event: Event) -> Step:
        """The answer to the state's pending action; returns the next step."""
        if state.finished:
            raise FlowFinished(f"the call left the flow at {state.node}")
        if state.flow_id != self.flow_id or state.version != self.version:
            raise InterpreterError("the state belongs to another flow version")
        state = _copy(state)
        if isinstance(event, CallerHungUp):
            state.finished = True
            state.waiting = "nothing"
            return Step(state, CallerGone(state.node), ())
        node = self.graph.nodes[state.node]
        expected = {
            "played": (PlaybackDone,),
            "digits": (DigitsEntered, NoInput),
            "hours": (HoursAnswer,),
            "customer": (CustomerAnswer,),
        }.get(state.waiting, ())
        if not isinstance(event, expected):
            raise UnexpectedEvent(f"node {state.node} waits for {state.waiting}, not {type(event).__name__}")
        if isinstance(node, PlayNode):
            return self._enter(state, node.next, [])
        if isinstance(node, HoursNode) and isinstance(event, HoursAnswer):
            return self._enter(state, node.open if event.open else node.closed, [])
        if isinstance(node, BranchNode) and isinstance(event, CustomerAnswer):
            state.customer = {str(k): str(v) for k, v in event.attributes.items()}
            return self._enter(state, self._branch(state, node), [])
        if isinstance(node, MenuNode):
            return self._menu(state, node, event)
        if isinstance(node, CollectNode):
            return self._collect(state, node, event)
        if isinstance(node, CallbackOfferNode):
            return self._callback(state, node, event)
        raise UnexpectedEvent(f"node {state.node} ({type(node).__name__}) takes no event")  # pragma: no cover

    # --- entering nodes -----------------------------------------------------------------------

    def _speech(self, state: CallState, prompt: Prompt | None) -> Speech | None:
        if prompt is None:
            return None
        if isinstance(prompt, TtsPrompt):
            return Speech(prompt, prompt.language or state.language, prompt.voice or state.voice)
        return Speech(prompt, state.language, state.voice)

    def _speeches(self, state: CallState, *prompts: Prompt | None) -> tuple[Speech, ...]:
        return tuple(s for s in (self._speech(state, p) for p in prompts) if s is not None)

    def _finish(self, state: CallState, action: Action, trace: list[str]) -> Step:
        state.finished = True
        state.waiting = "nothing"
        return Step(state, action, tuple(trace))

    def _enter(self, state: CallState, node_id: str, trace: list[str]) -> Step:
        """Enter nodes until one needs the outside world (or the call leaves the flow)."""
        while True:
            state.steps += 1
            state.node = node_id
            if state.steps > self.max_steps:
                return self._finish(state, Hangup(None, "NORMAL_CLEARING", "step_limit"), trace)
            node: Node = self.graph.nodes[node_id]
            state.visits[node_id] = state.visits.get(node_id, 0) + 1
            trace.append(node_id)
            state.attempt = 0
            if node.max_visits is not None and state.visits[node_id] > node.max_visits:
                if node.on_exhausted is None:
                    return self._finish(state, Hangup(None, "NORMAL_CLEARING", "visits_exhausted"), trace)
                node_id = node.on_exhausted
                continue
            if isinstance(node, SetLanguageNode):
                state.language = node.language
                state.voice = node.voice
                state.variables["language"] = node.language
                node_id = node.next
                continue
            if isinstance(node, BranchNode):
                if node.source == "customer" and state.customer is None:
                    state.waiting = "customer"
                    return Step(state, LookUpCustomer(), tuple(trace))
                node_id = self._branch(state, node)
                continue
            return self._act(state, node, trace)

    def _act(self, state: CallState, node: Node, trace: list[str]) -> Step:
        if isinstance(node, PlayNode):
            state.waiting = "played"
            return Step(state, Play(self._speeches(state, node.prompt)), tuple(trace))
        if isinstance(node, MenuNode | CollectNode | CallbackOfferNode):
            state.waiting = "digits"
            return Step(state, self._collect_action(state, node, (node.prompt,)), tuple(trace))
        if isinstance(node, HoursNode):
            state.waiting = "hours"
            return Step(state, CheckHours(node.business_hours_id), tuple(trace))
        if isinstance(node, QueueNode):
            attributes = dict(node.attributes)
            for name in node.variables:
                if name in state.variables:
                    attributes[name] = state.variables[name]
            return self._finish(state, Enqueue(node.queue_id, node.priority, attributes, state.language), trace)
        if isinstance(node, VoicemailNode):
            action = Voicemail(node.queue_id, node.agent_id, self._speech(state, node.greeting), node.max_seconds)
            return self._finish(state, action, trace)
        if isinstance(node, TransferNode):
            return self._finish(state, Transfer(node.target, node.queue_id, node.agent_id, node.number), trace)
        if isinstance(node, HangupNode):
            return self._finish(state, Hangup(self._speech(state, node.prompt), node.cause, "flow"), trace)
        raise InterpreterError(f"cannot act on {type(node).__name__}")  # pragma: no cover

    def _collect_action(
        self, state: CallState, node: MenuNode | CollectNode | CallbackOfferNode, prompts: tuple[Prompt | None, ...]
    ) -> Collect:
        speech = self._speeches(state, *prompts)
        if isinstance(node, CollectNode):
            return Collect(speech, node.min_digits, node.max_digits, node.timeout_seconds * 1000, node.terminator)
        return Collect(speech, 1, 1, node.timeout_seconds * 1000, "")

    def _branch(self, state: CallState, node: BranchNode) -> str:
        if node.source == "customer":
            value = (state.customer or {}).get(node.name)
        elif node.name == "language":
            value = state.language
        else:
            value = state.variables.get(node.name)
        for case in node.cases:
            if case_holds(case, value):
                return case.next
        return node.default

    # --- answers to collections ---------------------------------------------------------------

    def _retry(
        self,
        state: CallState,
        node: MenuNode | CollectNode | CallbackOfferNode,
        before: Prompt | None,
        on_failure: str | None,
        failure: Action | None = None,
    ) -> Step:
        """Ask again after a wrong or missing answer, or give up once the retries are spent."""
        state.attempt += 1
        if state.attempt > node.max_retries:
            if on_failure is not None:
                return self._enter(state, on_failure, [])
            return self._finish(state, failure or Hangup(None, "NORMAL_CLEARING", "retries_exhausted"), [])
        return Step(state, self._collect_action(state, node, (before, node.prompt)), ())

    def _menu(self, state: CallState, node: MenuNode, event: Event) -> Step:
        if isinstance(event, DigitsEntered):
            key = event.digits.strip()[:1]
            if key and key in node.options:
                return self._enter(state, node.options[key], [])
            return self._retry(state, node, node.invalid_prompt, node.on_failure)
        return self._retry(state, node, node.retry_prompt, node.on_failure)

    def _collect(self, state: CallState, node: CollectNode, event: Event) -> Step:
        if isinstance(event, DigitsEntered):
            digits = event.digits.strip()
            if node.terminator and digits.endswith(node.terminator):
                digits = digits[: -len(node.terminator)]
            if digits.isdigit() and digits.isascii() and node.min_digits <= len(digits) <= node.max_digits:
                state.variables[node.variable] = digits
                return self._enter(state, node.next, [])
        return self._retry(state, node, node.invalid_prompt, node.on_failure)

    def _callback(self, state: CallState, node: CallbackOfferNode, event: Event) -> Step:
        if isinstance(event, DigitsEntered):
            if event.digits.strip()[:1] == node.accept_digit:
                number = state.variables.get(node.number_variable) if node.number_variable else None
                action = RequestCallback(node.queue_id, number, node.priority, self._speech(state, node.confirmation))
                return self._finish(state, action, [])
            return self._enter(state, node.declined, [])
        return self._retry(state, node, None, node.declined)
