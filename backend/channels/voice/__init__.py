"""The voice channel: FreeSWITCH nodes, xml_curl, numbers, CDRs, registrations; the ESL library and switch simulator."""
