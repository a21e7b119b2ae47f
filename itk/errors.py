"""What every toolkit module raises and returns: the user-fixable error and the exit codes.

Its own module (not itk.console) so that command modules never import the renderer that imports them.
The exit codes are the protocol's: the generator and itk agree on them; the toolkit says "usage" for bad input.
"""

from __future__ import annotations

from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_MISSING_WEIGHTS, EXIT_OK

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_MISSING_WEIGHTS", "EXIT_OK", "EXIT_USAGE", "UserError"]

EXIT_USAGE = EXIT_BAD_INPUT


class UserError(Exception):
    """A failure the user can fix: printed as one line of what went wrong and one of how to fix it."""

    def __init__(self, message: str, fix: str = "", exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code
