"""Hosted multi-tenant contact center: the API, workers and voice control."""
