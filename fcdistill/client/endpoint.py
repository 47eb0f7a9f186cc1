"""The up-front endpoint check: fail before the first question, naming the URL, when nothing answers."""

from __future__ import annotations


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint that cannot be used at all: nothing answers, or it refuses the key."""


def check_endpoint(endpoint: str, api_key: str | None, timeout_s: float = 10.0,
                   key_hint: str = "--api-key") -> list[str] | None:
    """Fail fast, naming the URL, when nothing answers at `endpoint` (a base URL ending in /v1) or it
    refuses the key; returns the served model ids when the endpoint lists them. `fcd eval run`,
    `fcd label`, `fcd synth` and `fcd verify --judge` call it before their first question."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{endpoint}/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EndpointError(f"endpoint {endpoint} is unreachable: {type(exc).__name__}: "
                            f"{str(exc) or 'no answer'}"[:300]) from None
    if resp.status_code in (401, 403):
        raise EndpointError(f"endpoint {endpoint} rejected the API key (HTTP {resp.status_code}); check {key_hint}")
    try:
        return [m["id"] for m in resp.json()["data"]] if resp.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        return None
