"""What went wrong when a preset's file could not be downloaded from Kaggle
or the Hugging Face Hub, and what to do about it.

KerasHub's `get_file` turns some download failures (a gated file's 403,
huggingface_hub's offline error) into `FileNotFoundError`, as for a file the
preset does not have: the chain of raised errors tells them apart.
"""

import re

# Classes (or their bases) of what requests, httpx, huggingface_hub and the
# standard library raise when the connection fails or drops.
_CONNECTION_FAILURES = {
    "ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "gaierror",
    "ChunkedEncodingError", "TransportError", "HTTPException", "LocalEntryNotFoundError",
}
# ... and when the server answers with an error status (gated, 5xx).
_HTTP_ERRORS = {"RequestException", "HfHubHTTPError", "HTTPError"}
# A file the hub says is not there (404): missing, not a failure.
_NOT_THERE = {"EntryNotFoundError", "RemoteEntryNotFoundError"}


def _chain(error):
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def _class_names(error):
    return {cls.__name__ for cls in type(error).__mro__}


def _unreachable(error):
    """The error, or one it was raised from, that says the connection
    failed or dropped; else None."""
    return next((e for e in _chain(error) if _class_names(e) & _CONNECTION_FAILURES), None)


def fetch_failure(error):
    """The error, or one it was raised from, that says a remote file could
    not be fetched (connection, access, server error); None when the hub
    said the file is not there, or for any other error."""
    for e in _chain(error):
        if type(e).__name__ in _NOT_THERE or "404 Client Error" in str(e):
            return None
        if _class_names(e) & (_CONNECTION_FAILURES | _HTTP_ERRORS):
            return e
    return None


# How each hub lets a gated model (Gemma's are) be downloaded.
_HUB_ACCESS = {
    "hf://": "log in (`hf auth login`, or HF_TOKEN) and accept the license on the model's "
    "Hugging Face page",
    "kaggle://": "log in (`kagglehub.login()`, or KAGGLE_USERNAME/KAGGLE_KEY) and accept "
    "the Gemma license on the model's Kaggle page",
}


def _hf_hub_offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def download_error(preset, handle, error):
    """The error to raise when `preset` (resolved to `handle`) could not be
    downloaded because of `error`."""
    unreachable = _unreachable(error)
    if unreachable is not None and handle.startswith("hf://") and _hf_hub_offline():
        error = "HF_HUB_OFFLINE is set, and huggingface_hub's cache does not hold it"
        advice = "Unset HF_HUB_OFFLINE to download it"
    elif unreachable is not None:
        error = f"the server could not be reached (offline?): {unreachable}"
        advice = "Check the network connection and try again"
    elif re.search(r"\b5\d\d Server Error", str(fetch_failure(error) or error)):
        advice = "The hub had a server error: try again later"
    else:
        hub = "hf://" if handle.startswith("hf://") else "kaggle://"
        advice = f"Check the handle's spelling; for a gated model, {_HUB_ACCESS[hub]}"
    return OSError(
        f"Could not download {preset!r} ({handle}): {error}\n{advice}. Or download "
        "the preset yourself and pass its local directory."
    )
