"""The stacking step's user error, and how many keys an error message lists per problem."""

from __future__ import annotations

from retina_io.errors import RetinaError

SHOW = 10  # keys listed per problem in an error message


class StackError(RetinaError, RuntimeError):
    """A problem with the inputs of stacking that the user can fix (the message names the input and the fix)."""
