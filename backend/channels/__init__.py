"""Customer-facing channels: voice (FreeSWITCH), and later web chat and WeChat."""
