"""The voice channel: FreeSWITCH nodes, xml_curl directory and dialplan, numbers, CDRs, registrations."""
