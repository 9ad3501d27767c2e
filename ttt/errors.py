"""User errors: anything a user can fix by changing an input. The CLI prints the message
as one line and exits with code 2, never with a traceback."""


class UserError(Exception):
    exit_code = 2


class Interrupted(Exception):
    """A command stopped by a signal. The CLI prints the message as one line (what was
    kept and how to go on) and exits with 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str = "interrupted", signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum
