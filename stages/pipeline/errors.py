"""The one error type that means "the user's input is wrong" (exit code 2).

Its message is a single line naming the bad field, column, key path or file, so the CLI can
print it as it is. Anything else raised while running is a failure (exit code 1).
"""


class BadInput(Exception):
    """Bad config, data, model path or missing upstream artifact. One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# Exception classes of the network and object-store clients (botocore, urllib3, aiohttp, httpx,
# requests, http.client) that mean "try again": a dropped connection, a timeout, throttling.
TRANSIENT_NAMES = frozenset({
    "ConnectionError", "ConnectError", "ConnectTimeout", "ConnectTimeoutError", "ReadTimeout", "ReadTimeoutError",
    "EndpointConnectionError", "ClientConnectorError", "ServerDisconnectedError", "RemoteDisconnected",
    "RemoteProtocolError", "IncompleteRead", "ProtocolError", "SlowDown", "ThrottlingException", "Timeout",
})


def is_transient(exc: BaseException | None) -> bool:
    """A failure that running the stage again may not meet: the network or the store, anywhere in the
    exception's chain. A bad input, a bug or a non-finite loss fails the same way again: never."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BadInput):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_NAMES:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
