"""One exception type for every mistake a user can cause.

The CLI turns a `UserError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, wrong checkpoint...).

    The message must name the problem *and* what to do about it, in one line.
    """
