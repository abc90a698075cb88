"""Routing (ACD): interactions, queues, skills, agent states, the matcher and the agent WebSocket hub."""
