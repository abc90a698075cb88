"""Contact channels: voice (FreeSWITCH), web chat and WeChat adapters."""
