"""The one HTTP client of metattt: JSON requests to an OpenAI-compatible server (vLLM, SGLang, a
hosted API), with urllib only. Data regeneration (`prepare.regenerate: endpoint`) and the rubric
judge of guided evaluation both go through `request_json`; each keeps its own retry policy."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class EndpointError(RuntimeError):
    """A failed request: `status` is the HTTP status, None when no answer came (connection, timeout,
    a body that is not JSON)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Connection errors, timeouts, 408, 429 and 5xx may succeed when tried again."""
        return self.status is None or self.status in (408, 429) or self.status >= 500


def request_json(url: str, payload: dict | None = None, *, method: str | None = None, api_key: str | None = None,
                 timeout_s: float = 60.0) -> dict:
    """One request (POST with `payload`, else GET) to `url`; the decoded JSON answer.

    Raises:
        EndpointError: on an HTTP error status, a connection error or timeout, or a non-JSON body.
    """
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")[:300]
        raise EndpointError(f"HTTP {e.code} from {url}: {body}", e.code) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, json.JSONDecodeError) as e:
        raise EndpointError(f"{type(e).__name__} from {url}: {e}") from e
