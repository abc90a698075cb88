"""The shared customer store: records, screen pop, history, tickets, import and export, erasure."""
