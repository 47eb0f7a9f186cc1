"""The one client for OpenAI-compatible endpoints, below every stage that talks to one (teacher, eval).

- `config`: `ClientConfig`, the endpoint's settings (stages extend or build it);
- `http`: `Client` (retries, bounded concurrency, request cache, stats), `ChatReply` with its HTTP
  status, `run_bounded` / `gather_bounded` for many items under one limit;
- `cache`: the SQLite request cache and its stable request key;
- `endpoint`: `check_endpoint`, the fail-fast check before a run's first question.

Importing this package is light; openai and tenacity load when a `Client` is made.
"""

from fcdistill.client.cache import ResponseCache, request_key
from fcdistill.client.config import ClientConfig
from fcdistill.client.endpoint import EndpointError, check_endpoint
from fcdistill.client.http import ChatReply, Client, ClientStats, gather_bounded, progress_bar, run_bounded

__all__ = ["ChatReply", "Client", "ClientConfig", "ClientStats", "EndpointError", "ResponseCache", "check_endpoint",
           "gather_bounded", "progress_bar", "request_key", "run_bounded"]
