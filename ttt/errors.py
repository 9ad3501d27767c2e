"""User errors: anything a user can fix by changing an input. The CLI prints the message
as one line and exits with code 2, never with a traceback."""


class UserError(Exception):
    exit_code = 2
