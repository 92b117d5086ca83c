"""Talking to the Hugging Face hub: every request bounded in time, network failures retried, and one table
that turns the hub's failures into one-line errors, for downloads (SOURCE) and uploads (push) alike.

huggingface_hub's own client waits forever and raises its own exceptions; `bound_hub_requests` and
`with_retries` bound the waiting, and `hub_errors` maps each exception through `_FAILURES`: one row per
failure, saying it for each direction where a direction has something to say (a missing repo is the
user's typo when downloading, a namespace the token cannot write to when uploading). Rows are tried in
order, as `except` clauses would be, skipping those that say nothing for the direction at hand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from precompile.errors import UserError

HUB_TIMEOUT_ENV = "PRECOMPILE_HUB_TIMEOUT"  # seconds a hub request may wait for the next byte (default 60)
HUB_TRIES = 3  # each call of this tool to the hub, at most (a timeout or a broken connection is retried)


def hub_timeout() -> float:
    raw = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else 60.0
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise UserError(f"{HUB_TIMEOUT_ENV}={raw!r} is not a number of seconds between 0 and 86400; fix or unset it")
    return value


def bound_hub_requests() -> None:
    """Give every request huggingface_hub makes a timeout (`PRECOMPILE_HUB_TIMEOUT` seconds to connect, and
    between two bytes sent or received): its own client has none, so an endpoint that accepts the connection
    and never answers would hold a download or a push forever. Idempotent."""
    import huggingface_hub

    timeout = hub_timeout()
    if hasattr(huggingface_hub, "set_client_factory"):  # huggingface_hub >= 1.0: httpx / httpx2
        from huggingface_hub.utils import _http

        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        base = getattr(current, "precompile_base", current)
        if getattr(current, "precompile_timeout", None) == timeout:
            return

        def factory():
            client = base()
            client.timeout = timeout
            return client

        factory.precompile_base, factory.precompile_timeout = base, timeout
        huggingface_hub.set_client_factory(factory)
    else:  # older releases: requests
        import requests

        class Session(requests.Session):
            def request(self, *args, **kwargs):
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = timeout
                return super().request(*args, **kwargs)

        huggingface_hub.configure_http_backend(backend_factory=Session)


def with_retries(call, *args, **kwargs):
    """call(*args, **kwargs), tried HUB_TRIES times in all when the network fails (a timeout, a refused or
    broken connection; not an answer of the hub such as 401 or 404), 1 s then 2 s apart."""
    import time

    from huggingface_hub.errors import HfHubHTTPError

    transport = HfHubHTTPError.__bases__[0]  # the HTTP library's own error (httpx, httpx2 or requests)
    for attempt in range(HUB_TRIES):
        try:
            return call(*args, **kwargs)
        except (transport, ConnectionError, TimeoutError) as e:
            if isinstance(e, HfHubHTTPError) or attempt == HUB_TRIES - 1:
                raise
        time.sleep(2 ** attempt)


# ---------------------------------------------------------------------------------------------- failures


Direction = Literal["download", "upload"]
NO_TOKEN = "no Hugging Face token: set HF_TOKEN to a token with write access, or run `hf auth login`"


@dataclass(frozen=True)
class HubFailure:
    """What a message may name: the repo, its revision, the file being fetched (downloads), the error."""

    repo_id: str
    revision: str | None
    what: str
    error: BaseException

    @property
    def at(self) -> str:
        """`repo@revision`, or the repo alone."""
        return f"{self.repo_id}{'@' + self.revision if self.revision else ''}"


Say = Callable[[HubFailure], str]


@dataclass(frozen=True)
class _Failure:
    errors: tuple[str, ...]  # huggingface_hub.errors names, builtins, or "transport" (the HTTP library's error)
    download: Say | None = None
    upload: Say | None = None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def _not_cached(f: HubFailure) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = ("it is not in the HF cache and HF_HUB_OFFLINE is set; download it first or unset HF_HUB_OFFLINE"
            if offline else "the hub cannot be reached and it is not in the HF cache; check the network")
    target = f"{f.what} of " if f.what else ""
    return f"{target}{f.at}: {hint}"


def _unreachable(f: HubFailure) -> str:
    from huggingface_hub import constants

    return (f"cannot reach the hub at {constants.ENDPOINT} after {HUB_TRIES} tries ({_first_line(f.error)}); "
            f"check the network and HF_ENDPOINT ({HUB_TIMEOUT_ENV} sets the seconds to wait), then push again")


def _http_refusal(f: HubFailure) -> str:
    e, repo_id = f.error, f.repo_id
    status = getattr(getattr(e, "response", None), "status_code", None)
    detail = (getattr(e, "server_message", None) or str(e)).strip().splitlines()
    detail = detail[0] if detail else ""
    if status == 401:
        return (f"authentication failed (401): HF_TOKEN is missing, invalid or expired; set HF_TOKEN to a write "
                f"token or run `hf auth login` ({detail})")
    if status in (402, 413) or any(w in detail.lower() for w in ("quota", "storage limit", "exceeded")):
        return (f"the hub refused the upload to {repo_id}: quota exceeded ({status}: {detail}); free space in the "
                f"account or organization, or push to another namespace")
    if status == 403:
        return (f"permission denied (403) for {repo_id}: the token cannot write to this namespace; use a token "
                f"with write access to it, or another REPO_ID ({detail})")
    if status == 429:
        return f"the hub is rate-limiting requests (429: {detail}); wait a few minutes and push again"
    return f"the hub refused the request for {repo_id} ({status}: {detail}); check REPO_ID and push again"


# In `except` order: a subclass before its base (GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError
# an EntryNotFoundError, all HTTP answers HfHubHTTPErrors, and nearly everything an OSError).
_FAILURES = (
    _Failure(("HFValidationError",),
             download=lambda f: f"{f.at}: not a valid hub repo id or revision "
                                f"({str(f.error).splitlines()[0][:160]}); check SOURCE and --revision"),
    _Failure(("GatedRepoError",),
             download=lambda f: f"{f.repo_id} is gated; accept its licence on the hub and set HF_TOKEN"),
    _Failure(("RepositoryNotFoundError",),
             download=lambda f: f"{f.repo_id} not found on the hub; check the repo id, or set HF_TOKEN for a "
                                f"private repo",
             upload=lambda f: f"{f.repo_id} not found and could not be created: the namespace does not exist or "
                              f"the token cannot write to it; check REPO_ID and HF_TOKEN"),
    _Failure(("RevisionNotFoundError",),
             download=lambda f: f"revision {f.revision} of {f.repo_id} not found; check --revision",
             upload=lambda f: f"branch {f.revision} of {f.repo_id} not found and not created; check --revision"),
    _Failure(("LocalEntryNotFoundError",), download=_not_cached),
    _Failure(("EntryNotFoundError",),
             download=lambda f: f"{f.at} has no file {f.what}; the repo's index names a file it does not hold, "
                                f"re-upload or pick another revision"),
    _Failure(("HfHubHTTPError",), upload=_http_refusal),
    _Failure(("LocalTokenNotFoundError",), upload=lambda f: NO_TOKEN),
    _Failure(("OfflineModeIsEnabled",),
             upload=lambda f: "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push"),
    _Failure(("transport", "ConnectionError", "TimeoutError"), upload=_unreachable),
    _Failure(("OSError",),  # a network, local file or cache problem
             download=lambda f: f"{f.repo_id}: download failed ({f.error}); check the network, disk space and "
                                f"HF_TOKEN",
             upload=lambda f: f"uploading to {f.repo_id} failed ({_first_line(f.error)}); check OUT_DIR and the "
                              f"disk, then push again"),
)


def _classes(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    import builtins

    from huggingface_hub import errors

    return tuple(errors.HfHubHTTPError.__bases__[0] if n == "transport" else
                 getattr(errors, n, None) or getattr(builtins, n) for n in names)


@contextmanager
def hub_errors(direction: Direction, repo_id: str, revision: str | None, what: str = "") -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line UserErrors that say what to do (`_FAILURES`); what the
    table does not name for this direction passes through unchanged."""
    rows = [(_classes(r.errors), getattr(r, direction)) for r in _FAILURES]
    try:
        yield
    except Exception as e:
        say = next((say for classes, say in rows if say is not None and isinstance(e, classes)), None)
        if say is None:
            raise
        raise UserError(say(HubFailure(repo_id, revision, what, e))) from None
