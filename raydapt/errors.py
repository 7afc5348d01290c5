"""Error types that decide the exit code: UserError -> 2, anything else -> 1."""


class UserError(Exception):
    """Bad config or input. The message names the file or key and says what to do."""

    exit_code = 2
