"""The IVR graph checks and the sans-IO interpreter: every node type, bad input, loops, and random graphs."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.routing.ivr import FlowGraph, GraphLimits, check_graph, references
from backend.routing.ivr_interpreter import (
    TERMINAL_ACTIONS,
    CallerGone,
    CallerHungUp,
    CallState,
    CheckHours,
    Collect,
    CustomerAnswer,
    DigitsEntered,
    Enqueue,
    FlowFinished,
    FlowInterpreter,
    Hangup,
    HoursAnswer,
    LookUpCustomer,
    NoInput,
    Play,
    PlaybackDone,
    RequestCallback,
    Step,
    Transfer,
    UnexpectedEvent,
    Voicemail,
)

pytestmark = pytest.mark.unit

LIMITS = GraphLimits(max_nodes=200, max_bytes=131_072, max_visits=20, max_retries=10, max_voicemail_seconds=300)
QUEUE = str(uuid.uuid4())
HOURS = str(uuid.uuid4())
PROMPT = str(uuid.uuid4())
AGENT = str(uuid.uuid4())


def tts(text: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "tts", "text": text, **extra}


def graph(nodes: dict[str, Any], start: str = "start") -> FlowGraph:
    return msgspec.convert({"start": start, "nodes": nodes}, FlowGraph)


def interpreter(nodes: dict[str, Any], start: str = "start", max_steps: int = 1000) -> FlowInterpreter:
    flow = graph(nodes, start)
    assert check_graph(flow, LIMITS) == []
    return FlowInterpreter(uuid.uuid4(), 1, flow, max_steps=max_steps)


def fields(flow: FlowGraph) -> dict[str, str]:
    return {e["field"]: e["message"] for e in check_graph(flow, LIMITS)}


MAIN_MENU = {
    "start": {"type": "set_language", "language": "fr-FR", "voice": "alice", "next": "hours"},
    "hours": {"type": "hours", "business_hours_id": HOURS, "open": "welcome", "closed": "closed"},
    "closed": {"type": "voicemail", "queue_id": QUEUE, "greeting": tts("Nous sommes fermés")},
    "welcome": {"type": "play", "prompt": {"kind": "file", "prompt_id": PROMPT}, "next": "menu"},
    "menu": {
        "type": "menu",
        "prompt": tts("Tapez 1 pour les ventes, 2 pour votre compte, 3 pour être rappelé"),
        "options": {"1": "sales", "2": "account", "3": "callback", "0": "operator"},
        "invalid_prompt": tts("Choix invalide"),
        "retry_prompt": tts("Nous n'avons rien entendu"),
        "max_retries": 2,
        "on_failure": "bye",
        "max_visits": 3,
        "on_exhausted": "bye",
    },
    "sales": {"type": "queue", "queue_id": QUEUE, "priority": 70, "attributes": {"line": "sales"}},
    "account": {
        "type": "collect",
        "prompt": tts("Votre numéro de compte, suivi de dièse"),
        "variable": "account",
        "min_digits": 4,
        "max_digits": 8,
        "next": "vip",
        "on_failure": "menu",
    },
    "vip": {
        "type": "branch",
        "source": "customer",
        "name": "tier",
        "cases": [{"op": "equals", "value": "gold", "next": "gold"}],
        "default": "by_account",
    },
    "by_account": {
        "type": "branch",
        "source": "variable",
        "name": "account",
        "cases": [{"op": "less_than", "value": "5000", "next": "old"}],
        "default": "sales_with_account",
    },
    "gold": {"type": "transfer", "target": "agent", "agent_id": AGENT},
    "old": {"type": "transfer", "target": "external", "number": "+33 1 42 68 53 00"},
    "sales_with_account": {"type": "queue", "queue_id": QUEUE, "variables": ["account"]},
    "callback": {
        "type": "callback_offer",
        "prompt": tts("Tapez 1 pour être rappelé"),
        "queue_id": QUEUE,
        "confirmation": tts("Nous vous rappelons"),
        "declined": "menu",
    },
    "operator": {"type": "transfer", "target": "queue", "queue_id": QUEUE},
    "bye": {"type": "hangup", "prompt": tts("Au revoir")},
}


def test_the_example_flow_is_valid_and_names_its_references():
    flow = graph(MAIN_MENU)
    assert check_graph(flow, LIMITS) == []
    refs = references(flow)
    assert set(map(str, refs.queues)) == {QUEUE}
    assert set(map(str, refs.hours)) == {HOURS}
    assert set(map(str, refs.prompts)) == {PROMPT}
    assert set(map(str, refs.agents)) == {AGENT}
    assert refs.prompts[uuid.UUID(PROMPT)] == ["graph.nodes.welcome.prompt.prompt_id"]
    # The external number was normalised to E.164.
    assert flow.nodes["old"].number == "+33142685300"  # type: ignore[union-attr]


def run(ivr: FlowInterpreter, *events: Any, variables: dict[str, str] | None = None) -> list[Step]:
    steps = [ivr.start(variables or {"caller_number": "+33600000001", "did": "+33100000000"})]
    for event in events:
        steps.append(ivr.advance(steps[-1].state, event))
    return steps


def test_open_hours_menu_to_sales_queue_carries_language_and_trace():
    ivr = interpreter(MAIN_MENU)
    steps = run(ivr, HoursAnswer(True), PlaybackDone(), DigitsEntered("1"))
    first, played, menu, queued = steps
    assert isinstance(first.action, CheckHours)
    assert first.trace == ("start", "hours")
    assert isinstance(played.action, Play)
    assert isinstance(menu.action, Collect)
    assert (menu.action.min_digits, menu.action.max_digits, menu.action.timeout_ms) == (1, 1, 5000)
    speech = menu.action.speech[0]
    assert (speech.language, speech.voice) == ("fr-FR", "alice")
    assert queued.finished
    assert queued.action == Enqueue(uuid.UUID(QUEUE), 70, {"line": "sales"}, "fr-FR")
    assert queued.trace == ("sales",)


def test_closed_hours_leave_a_voicemail_with_the_greeting():
    step = run(interpreter(MAIN_MENU), HoursAnswer(False))[-1]
    assert isinstance(step.action, Voicemail)
    assert step.action.queue_id == uuid.UUID(QUEUE)
    assert step.action.greeting is not None
    assert step.action.greeting.language == "fr-FR"
    assert step.action.max_seconds == 120


def test_invalid_key_and_silence_replay_the_menu_then_fail_over():
    ivr = interpreter(MAIN_MENU)
    steps = run(ivr, HoursAnswer(True), PlaybackDone(), DigitsEntered("7"), NoInput(), DigitsEntered("#"))
    invalid, silent, failed = steps[3], steps[4], steps[5]
    assert isinstance(invalid.action, Collect)
    assert [s.prompt.text for s in invalid.action.speech] == ["Choix invalide", MAIN_MENU["menu"]["prompt"]["text"]]  # type: ignore[union-attr]
    assert isinstance(silent.action, Collect)
    assert silent.action.speech[0].prompt.text == "Nous n'avons rien entendu"  # type: ignore[union-attr]
    assert failed.finished
    assert isinstance(failed.action, Hangup)
    assert failed.action.reason == "flow"
    assert failed.trace == ("bye",)


def test_collect_validates_digits_strips_the_terminator_and_branches():
    ivr = interpreter(MAIN_MENU)
    steps = run(
        ivr,
        HoursAnswer(True),
        PlaybackDone(),
        DigitsEntered("2"),
        DigitsEntered("12#"),  # too short: asked again
        DigitsEntered("4321#"),
        CustomerAnswer({"tier": "silver"}),
    )
    assert isinstance(steps[4].action, Collect)
    assert steps[4].state.attempt == 1
    assert isinstance(steps[5].action, LookUpCustomer)
    final = steps[6]
    assert final.state.variables["account"] == "4321"
    assert final.action == Transfer("external", None, None, "+33142685300")
    assert final.trace == ("by_account", "old")


def test_customer_attribute_branch_and_variable_copied_to_queue():
    ivr = interpreter(MAIN_MENU)
    gold = run(
        ivr,
        HoursAnswer(True),
        PlaybackDone(),
        DigitsEntered("2"),
        DigitsEntered("9999"),
        CustomerAnswer({"tier": "gold"}),
    )
    assert gold[-1].action == Transfer("agent", None, uuid.UUID(AGENT), None)
    plain = run(ivr, HoursAnswer(True), PlaybackDone(), DigitsEntered("2"), DigitsEntered("9999"), CustomerAnswer({}))
    assert plain[-1].action == Enqueue(uuid.UUID(QUEUE), None, {"account": "9999"}, "fr-FR")


def test_callback_accepted_and_declined():
    ivr = interpreter(MAIN_MENU)
    accepted = run(ivr, HoursAnswer(True), PlaybackDone(), DigitsEntered("3"), DigitsEntered("1"))[-1]
    assert isinstance(accepted.action, RequestCallback)
    assert accepted.action.number is None
    assert accepted.action.confirmation is not None
    declined = run(ivr, HoursAnswer(True), PlaybackDone(), DigitsEntered("3"), NoInput(), NoInput())[-1]
    assert isinstance(declined.action, Collect)  # back at the menu
    assert declined.state.node == "menu"


def test_menu_visit_limit_ends_the_loop_between_menu_and_callback_offer():
    ivr = interpreter(MAIN_MENU)
    events: list[Any] = [HoursAnswer(True), PlaybackDone()]
    events += [DigitsEntered("3"), DigitsEntered("9")] * 3  # menu → callback offer → declined → menu ...
    final = run(ivr, *events)[-1]
    assert isinstance(final.action, Hangup)
    assert final.state.visits["menu"] == 4
    assert final.trace == ("menu", "bye")


def test_caller_hangs_up_at_any_step():
    ivr = interpreter(MAIN_MENU)
    answers: list[Any] = [HoursAnswer(True), PlaybackDone(), DigitsEntered("2"), DigitsEntered("4321")]
    for depth in range(len(answers) + 1):
        steps = run(ivr, *answers[:depth])
        if steps[-1].finished:
            continue
        gone = ivr.advance(steps[-1].state, CallerHungUp())
        assert gone.finished
        assert gone.action == CallerGone(steps[-1].state.node)
        with pytest.raises(FlowFinished):
            ivr.advance(gone.state, PlaybackDone())


def test_wrong_event_is_refused_and_state_is_not_changed():
    ivr = interpreter(MAIN_MENU)
    first = ivr.start()
    with pytest.raises(UnexpectedEvent):
        ivr.advance(first.state, DigitsEntered("1"))
    assert first.state.waiting == "hours"
    assert first.state.visits == {"start": 1, "hours": 1}


def test_state_round_trips_through_json_and_resumes():
    ivr = interpreter(MAIN_MENU)
    step = run(ivr, HoursAnswer(True), PlaybackDone())[-1]
    stored = msgspec.json.encode(step.state)
    resumed = ivr.advance(msgspec.json.decode(stored, type=CallState), DigitsEntered("0"))
    assert resumed.action == Transfer("queue", uuid.UUID(QUEUE), None, None)


def test_step_limit_is_a_safety_net():
    ivr = interpreter(MAIN_MENU, max_steps=2)
    step = run(ivr, HoursAnswer(True))[-1]
    assert isinstance(step.action, Hangup)
    assert step.action.reason == "step_limit"


def test_visits_exhausted_without_target_hangs_up():
    ivr = interpreter(
        {
            "start": {"type": "menu", "prompt": tts("1 again"), "options": {"1": "start"}, "max_visits": 2},
        }
    )
    final = run(ivr, DigitsEntered("1"), DigitsEntered("1"))[-1]
    assert isinstance(final.action, Hangup)
    assert final.action.reason == "visits_exhausted"


def test_retries_exhausted_without_on_failure_hangs_up():
    ivr = interpreter(
        {
            "start": {"type": "menu", "prompt": tts("x"), "options": {"1": "q"}, "max_retries": 0},
            "q": {"type": "hangup"},
        }
    )
    final = run(ivr, NoInput())[-1]
    assert isinstance(final.action, Hangup)
    assert final.action.reason == "retries_exhausted"


def test_branch_operators():
    from backend.routing.ivr import BranchCase
    from backend.routing.ivr_interpreter import case_holds

    def case(op: str, value: str = "", values: list[str] | None = None) -> BranchCase:
        return BranchCase(op=op, value=value, values=values or [], next="x")  # type: ignore[arg-type]

    assert case_holds(case("equals", "a"), "a")
    assert not case_holds(case("equals", "a"), None)
    assert case_holds(case("not_equals", "a"), None)
    assert case_holds(case("in", values=["a", "b"]), "b")
    assert case_holds(case("prefix", "+33"), "+331234")
    assert case_holds(case("less_than", "10"), "9.5")
    assert not case_holds(case("greater_than", "10"), "abc")
    assert case_holds(case("present"), "x")
    assert case_holds(case("absent"), "")


# --- what validation refuses -----------------------------------------------------------------


def test_dangling_edges_unreachable_nodes_and_a_missing_start():
    errors = fields(
        graph(
            {
                "start": {"type": "play", "prompt": tts("hi"), "next": "nowhere"},
                "island": {"type": "hangup"},
            },
            start="begin",
        )
    )
    assert errors["graph.start"] == "is not a node of the graph"
    assert "nowhere" in errors["graph.nodes.start.next"]
    ok_edges = fields(
        graph(
            {
                "start": {"type": "play", "prompt": tts("hi"), "next": "end"},
                "end": {"type": "hangup"},
                "island": {"type": "hangup"},
            }
        )
    )
    assert ok_edges == {"graph.nodes.island": "is not reachable from the start"}


def test_an_unbounded_loop_is_refused_and_named():
    errors = fields(
        graph(
            {
                "start": {"type": "menu", "prompt": tts("1 or 2"), "options": {"1": "info", "2": "end"}},
                "info": {"type": "play", "prompt": tts("info"), "next": "start"},
                "end": {"type": "hangup"},
            }
        )
    )
    ((field, message),) = errors.items()
    assert field.endswith(".max_visits")
    assert "start → info → start" in message or "info → start → info" in message


def test_a_loop_through_on_exhausted_is_refused():
    errors = fields(
        graph(
            {
                "start": {
                    "type": "menu",
                    "prompt": tts("menu"),
                    "options": {"1": "info"},
                    "max_visits": 2,
                    "on_exhausted": "info",
                },
                "info": {"type": "play", "prompt": tts("info"), "next": "start"},
            }
        )
    )
    assert list(errors) == ["graph.nodes.start.on_exhausted"]


def test_node_level_rules():
    errors = fields(
        graph(
            {
                "start": {
                    "type": "collect",
                    "prompt": tts("digits"),
                    "variable": "pin",
                    "min_digits": 6,
                    "max_digits": 4,
                    "max_retries": 50,
                    "next": "branch",
                    "on_exhausted": "end",
                },
                "branch": {
                    "type": "branch",
                    "source": "variable",
                    "name": "unknown_var",
                    "cases": [{"op": "less_than", "value": "abc", "next": "vm"}, {"op": "in", "next": "vm"}],
                    "default": "xfer",
                },
                "vm": {"type": "voicemail", "max_seconds": 3600},
                "xfer": {"type": "transfer", "target": "external", "queue_id": QUEUE, "number": "+99 123"},
                "end": {"type": "hangup"},
            }
        )
    )
    assert errors == {
        "graph.nodes.start.on_exhausted": "is only allowed with max_visits",
        "graph.nodes.start.max_retries": "at most 10",
        "graph.nodes.start.min_digits": "must not exceed max_digits",
        "graph.nodes.branch.name": "is not a variable any collect node sets (nor caller_number, did, language)",
        "graph.nodes.branch.cases[0].value": "must be a number for a comparison",
        "graph.nodes.branch.cases[1].values": "is required for op in",
        "graph.nodes.vm.queue_id": "exactly one of queue_id and agent_id names the box",
        "graph.nodes.vm.max_seconds": "at most 300",
        "graph.nodes.xfer.queue_id": "is not used when target is external",
        "graph.nodes.xfer.number": "is not a valid phone number in international format (+...)",
    }


def test_size_limits_come_from_settings():
    big = {f"n{i}": {"type": "play", "prompt": tts("x" * 900), "next": f"n{i + 1}"} for i in range(60)}
    big["n60"] = {"type": "hangup"}
    flow = graph(big, start="n0")
    small = GraphLimits(max_nodes=10, max_bytes=131_072, max_visits=20, max_retries=10, max_voicemail_seconds=300)
    assert check_graph(flow, small) == [{"field": "graph.nodes", "message": "at most 10 nodes"}]
    tight = GraphLimits(max_nodes=200, max_bytes=10_000, max_visits=20, max_retries=10, max_voicemail_seconds=300)
    [error] = check_graph(flow, tight)
    assert error["field"] == "graph"
    assert "at most 10000" in error["message"]


# --- random graphs: valid ones always terminate ----------------------------------------------

KINDS = ["play", "menu", "collect", "hours", "branch", "set_language", "callback_offer", "queue", "hangup"]


@st.composite
def random_graphs(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.integers(min_value=1, max_value=12))
    ids = [f"n{i}" for i in range(size)] + ["end"]
    nodes: dict[str, Any] = {"end": {"type": "hangup"}}

    def target(i: int) -> str:
        # Node i always gets an edge to i+1 first (every node reachable); others point anywhere.
        return draw(st.sampled_from(ids))

    for i in range(size):
        following = ids[i + 1]
        kind = draw(st.sampled_from(KINDS))
        node: dict[str, Any]
        if kind == "play":
            node = {"type": "play", "prompt": tts("p"), "next": following}
        elif kind == "menu":
            keys = draw(st.lists(st.sampled_from("0123456789*#"), min_size=1, max_size=4, unique=True))
            node = {"type": "menu", "prompt": tts("m"), "options": {k: target(i) for k in keys}}
            node["options"][keys[0]] = following
            node["max_retries"] = draw(st.integers(0, 3))
            if draw(st.booleans()):
                node["on_failure"] = target(i)
        elif kind == "collect":
            node = {
                "type": "collect",
                "prompt": tts("c"),
                "variable": "v",
                "min_digits": 1,
                "max_digits": 4,
                "next": following,
                "max_retries": draw(st.integers(0, 3)),
            }
            if draw(st.booleans()):
                node["on_failure"] = target(i)
        elif kind == "hours":
            node = {"type": "hours", "business_hours_id": HOURS, "open": following, "closed": target(i)}
        elif kind == "branch":
            node = {
                "type": "branch",
                "source": draw(st.sampled_from(["variable", "customer"])),
                "name": "caller_number",
                "cases": [{"op": "prefix", "value": "+33", "next": target(i)}],
                "default": following,
            }
        elif kind == "set_language":
            node = {"type": "set_language", "language": "en-GB", "next": following}
        elif kind == "callback_offer":
            node = {
                "type": "callback_offer",
                "prompt": tts("cb"),
                "queue_id": QUEUE,
                "declined": following,
                "max_retries": draw(st.integers(0, 2)),
            }
        elif kind == "queue":
            node = {"type": "queue", "queue_id": QUEUE}
        else:
            node = {"type": "hangup"}
        if draw(st.integers(0, 2)) == 0:
            node["max_visits"] = draw(st.integers(1, 3))
            if draw(st.booleans()):
                node["on_exhausted"] = draw(st.sampled_from(ids[i + 1 :]))
        nodes[ids[i]] = node
    return {"start": "n0", "nodes": nodes}


def answer(action: Any, draw: st.DrawFn) -> Any:
    if isinstance(action, Play):
        return PlaybackDone()
    if isinstance(action, CheckHours):
        return HoursAnswer(draw(st.booleans()))
    if isinstance(action, LookUpCustomer):
        return CustomerAnswer(draw(st.sampled_from([{}, {"caller_number": "+331"}])))
    assert isinstance(action, Collect)
    return draw(
        st.one_of(st.just(NoInput()), st.builds(DigitsEntered, st.text("0123456789*#", min_size=1, max_size=5)))
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=random_graphs(), data=st.data())
def test_random_valid_graphs_always_terminate(raw: dict[str, Any], data: st.DataObject):
    flow = msgspec.convert(raw, FlowGraph)
    if check_graph(flow, LIMITS):
        return
    nodes = len(flow.nodes)
    budget = sum(n.max_visits or 0 for n in flow.nodes.values())
    retries = max((getattr(n, "max_retries", 0) for n in flow.nodes.values()), default=0)
    # Between two runs of a limited node the call moves along an acyclic path: at most `nodes` entries.
    bound = (budget + 1) * (nodes + 1) * (retries + 2)
    ivr = FlowInterpreter(uuid.uuid4(), 1, flow, max_steps=10**9)
    step = ivr.start({"caller_number": "+33612345678", "did": "+33100000000"})
    events = 0
    while not step.finished:
        step = ivr.advance(step.state, answer(step.action, data.draw))
        events += 1
        assert events <= bound, f"no end after {events} events"
    assert isinstance(step.action, TERMINAL_ACTIONS)
    assert not (isinstance(step.action, Hangup) and step.action.reason == "step_limit")


@settings(max_examples=200, deadline=None)
@given(raw=random_graphs())
def test_graphs_refused_for_loops_really_have_an_unbounded_loop(raw: dict[str, Any]):
    """Independent check of the loop rule: a refused graph has a cycle the bounding edges can go round forever."""
    from backend.routing.ivr import bounding_edges

    flow = msgspec.convert(raw, FlowGraph)
    loop_errors = [e for e in check_graph(flow, LIMITS) if e["field"].endswith(("max_visits", "on_exhausted"))]

    # Brute force: from each node, follow bounding edges breadth-first and see whether it can come back.
    def returns(start: str) -> bool:
        seen: set[str] = set()
        frontier = list(bounding_edges(flow, start))
        while frontier:
            node = frontier.pop()
            if node == start:
                return True
            if node not in seen:
                seen.add(node)
                frontier.extend(bounding_edges(flow, node))
        return False

    assert bool(loop_errors) == any(returns(n) for n in flow.nodes)
