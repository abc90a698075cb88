"""The voice channel: FreeSWITCH integration over ESL and xml_curl."""
