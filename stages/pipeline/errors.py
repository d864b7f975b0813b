"""The one error type that means "the user's input is wrong" (exit code 2).

Its message is a single line naming the bad field, column, key path or file, so the CLI can
print it as it is. Anything else raised while running is a failure (exit code 1).
"""


class BadInput(Exception):
    """Bad config, data, model path or missing upstream artifact. One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
