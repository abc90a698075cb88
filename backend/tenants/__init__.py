"""Tenants: signup, plans, users, teams, roles, seats, SIP credentials, audit."""
