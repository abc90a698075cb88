"""Database access: engine, sessions, tenant context (RLS) and migrations."""
