"""mod_json_cdr: POST each leg's CDR, retry `retries` times `delay` apart, then write it to err-log-dir."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.channels.voice.simulator._switch import CallLeg, Switch

logger = logging.getLogger("backend.channels.voice.simulator")


async def deliver_cdr(switch: Switch, leg: CallLeg) -> None:
    from backend.channels.voice.simulator._switch import cdr_document, json_dumps_cdr, post_cdr

    uuid = leg.channel.uuid
    body = json_dumps_cdr(cdr_document(switch, leg))
    config = switch.config
    logger.info("mod_json_cdr.c:272 Process [%s.cdr.json]", uuid)
    attempts = 1 + max(0, config.cdr_retries)
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(config.cdr_delay)
        result = await post_cdr(switch, uuid, body)
        switch.record("json_cdr", uuid=uuid, attempt=attempt + 1, status=result.status)
        if 200 <= result.status < 300:
            switch.cdr_results.append({"uuid": uuid, "delivered": True, "attempts": attempt + 1})
            return
        logger.error("mod_json_cdr.c:399 Got error [%d] posting to web server [%s]", result.status, config.cdr_url)
    logger.error("mod_json_cdr.c:418 Unable to post to web server")
    path = Path(config.cdr_err_log_dir) / f"{uuid}.cdr.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The same JSON as the POST body, plus the newline mod_json_cdr's backup_cdr writes after it.
        path.write_bytes(body + b"\n")
        logger.info("mod_json_cdr.c:209 Backup file %s", path)
    except OSError as error:
        logger.error("Can't open %s! [%s]", path, error)
    switch.cdr_results.append({"uuid": uuid, "delivered": False, "attempts": attempts, "file": str(path)})
