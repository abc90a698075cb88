"""Where the real FreeSWITCH captures are, and helpers to read their transcripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(os.environ.get("CC_FREESWITCH_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "freeswitch"))


def fixture(relative: str) -> Path:
    path = FIXTURES / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the captures live in ../shared/fixtures/freeswitch")
    return path


def esl_files() -> list[Path]:
    files = sorted(FIXTURES.glob("*/*.esl"))
    if not files:
        raise FileNotFoundError(f"no .esl captures under {FIXTURES}")
    return files


def transcript(esl_path: Path) -> list[dict]:
    return [json.loads(line) for line in esl_path.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
