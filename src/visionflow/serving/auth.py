"""Bearer-token auth: the token named by serve.auth_token_env, and the FastAPI dependencies that check it."""

from __future__ import annotations

import hmac
import os

from fastapi import HTTPException, Request

from visionflow.errors import ConfigError


def bearer_token(env_name: str | None) -> str | None:
    """The token named by serve.auth_token_env; None when auth is off. A name whose variable is missing or blank
    is refused: serving open while the operator believes it is protected is the one outcome not allowed."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise ConfigError(
            f"serve.auth_token_env is {env_name!r}, but ${env_name} is unset or empty: export the "
            "token (or set serve.auth_token_env to null to serve without auth)"
        )
    return token


def token_dependencies(token: str | None):
    """(require_token, require_token_page): FastAPI dependencies that check the bearer token when `token` is set.
    require_token takes only the Authorization header, so the token stays out of URLs and access logs;
    require_token_page also takes ?token= for HTML pages a browser navigates to, where no header can be set."""

    def check(given: str) -> None:
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def header(request: Request) -> str:
        return request.headers.get("authorization", "").removeprefix("Bearer ").strip()

    async def require_token(request: Request) -> None:  # async: a sync dependency costs a thread hop
        check(header(request))

    async def require_token_page(request: Request) -> None:
        check(header(request) or request.query_params.get("token", ""))

    return require_token, require_token_page
