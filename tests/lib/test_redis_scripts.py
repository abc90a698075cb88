"""Scripts called in the same event-loop turn share a round trip, and each call still gets its own answer."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ResponseError

from backend.lib.redis_scripts import ScriptRunner
from tests.factories import unique

pytestmark = pytest.mark.integration

# KEYS[1]: a counter. ARGV[1]: how much to add; 'fail' makes this one call fail.
_ADD = r"""
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[1]}
"""


async def test_concurrent_calls_share_a_round_trip_and_keep_their_own_answers(redis):
    runner, script, key = ScriptRunner(redis), redis.register_script(_ADD), unique("test:scripts-")
    answers = await asyncio.gather(*(runner(script, [key], [n]) for n in range(1, 51)))
    assert [int(a[1]) for a in answers] == list(range(1, 51))
    assert sorted(int(a[0]) for a in answers) == sorted(n * (n + 1) // 2 for n in range(1, 51))  # in call order
    assert runner.round_trips < 5
    assert int(await redis.get(key)) == 1275


async def test_a_lone_call_goes_out_at_once(redis):
    runner, script, key = ScriptRunner(redis), redis.register_script(_ADD), unique("test:scripts-")
    for n in range(3):
        assert int((await runner(script, [key], [1]))[0]) == n + 1
    assert runner.round_trips == 3


async def test_a_failing_call_fails_alone(redis):
    runner, script, key = ScriptRunner(redis), redis.register_script(_ADD), unique("test:scripts-")
    answers = await asyncio.gather(
        runner(script, [key], [1]), runner(script, [key], ["fail"]), runner(script, [key], [2]), return_exceptions=True
    )
    assert int(answers[0][0]) == 1
    assert isinstance(answers[1], ResponseError) and "asked to fail" in str(answers[1])
    assert int(answers[2][0]) == 3


async def test_scripts_are_loaded_again_after_redis_forgot_them(redis):
    runner, script, key = ScriptRunner(redis), redis.register_script(_ADD), unique("test:scripts-")
    await redis.script_flush()
    assert int((await runner(script, [key], [1]))[0]) == 1  # alone
    await redis.script_flush()
    answers = await asyncio.gather(*(runner(script, [key], [1]) for _ in range(5)))  # in one pipeline
    assert sorted(int(a[0]) for a in answers) == [2, 3, 4, 5, 6]
