"""A small but real OpenID Connect provider on 127.0.0.1, for single sign-on tests.

It serves discovery, JWKS, an authorization endpoint that approves the next
scripted user at once, and a token endpoint that checks the client, the code,
the redirect URI and the PKCE verifier, and signs an RS256 ID token. Tests can
script the next user and tamper with the next ID token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from litestar import Litestar, Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect


@dataclass
class Grant:
    client_id: str
    redirect_uri: str
    nonce: str | None
    challenge: str | None
    user: dict[str, Any]


@dataclass
class OidcProvider:
    """Scriptable provider state; `url` is its issuer."""

    client_id: str = "contactcenter"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    user: dict[str, Any] = field(
        default_factory=lambda: {"sub": "u1", "email": "someone@example.test", "email_verified": True}
    )
    tamper: dict[str, Any] = field(default_factory=dict)
    """Claims to override in the next ID token (e.g. a wrong nonce or audience)."""
    fail_token_endpoint: bool = False
    url: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"}))
    grants: dict[str, Grant] = field(default_factory=dict)
    token_requests: int = 0

    def app(self) -> Litestar:
        provider = self

        @get("/.well-known/openid-configuration")
        async def discovery() -> dict[str, Any]:
            return {
                "issuer": provider.url,
                "authorization_endpoint": f"{provider.url}/authorize",
                "token_endpoint": f"{provider.url}/token",
                "jwks_uri": f"{provider.url}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }

        @get("/jwks")
        async def jwks() -> dict[str, Any]:
            return {"keys": [provider.key.as_dict(private=False)]}

        @get("/authorize", status_code=302)
        async def authorize(request: Request[Any, Any, Any]) -> Response[Any]:
            query = request.query_params
            if query.get("client_id") != provider.client_id or query.get("response_type") != "code":
                return Response({"error": "unauthorized_client"}, status_code=400)
            code = secrets.token_urlsafe(16)
            provider.grants[code] = Grant(
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                nonce=query.get("nonce"),
                challenge=query.get("code_challenge") if query.get("code_challenge_method") == "S256" else None,
                user=dict(provider.user),
            )
            return Redirect(f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}")

        @post("/token", status_code=200)
        async def token(
            data: dict[str, str] = Body(media_type=RequestEncodingType.URL_ENCODED),
        ) -> Response[Any]:
            provider.token_requests += 1
            if provider.fail_token_endpoint:
                return Response({"error": "server_error"}, status_code=500)
            grant = provider.grants.pop(data.get("code", ""), None)
            if grant is None or data.get("grant_type") != "authorization_code":
                return Response({"error": "invalid_grant"}, status_code=400)
            if data.get("client_id") != provider.client_id or data.get("client_secret") != provider.client_secret:
                return Response({"error": "invalid_client"}, status_code=401)
            if data.get("redirect_uri") != grant.redirect_uri:
                return Response({"error": "invalid_grant", "error_description": "redirect_uri"}, status_code=400)
            verifier = data.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
            if grant.challenge is None or digest != grant.challenge:
                return Response({"error": "invalid_grant", "error_description": "pkce"}, status_code=400)
            now = int(time.time())
            claims = {
                "iss": provider.url,
                "aud": provider.client_id,
                "iat": now,
                "exp": now + 300,
                "nonce": grant.nonce,
                **grant.user,
                **provider.tamper,
            }
            provider.tamper = {}
            id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, provider.key)
            return Response(
                {
                    "access_token": secrets.token_urlsafe(16),
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": id_token,
                }
            )

        return Litestar([discovery, jwks, authorize, token])


class RunningProvider:
    """The provider served by uvicorn in a background thread."""

    def __init__(self) -> None:
        self.provider = OidcProvider()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.provider.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.provider.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> OidcProvider:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the OIDC provider did not start")
            time.sleep(0.02)
        return self.provider

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
