"""Authentication and authorisation: passwords, tokens, SSO, API keys, permissions."""
