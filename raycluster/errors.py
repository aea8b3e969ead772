"""The errors every rayplane library raises for something a user can fix.

They live at the bottom layer so that any library may raise them without importing the
command line; the CLI (``raycluster.cli``) turns each into one line on stderr and exit code 2.
"""

from __future__ import annotations


class RayplaneError(Exception):
    """A user-fixable problem. ``str(err)`` is one line that says what is wrong and what to do."""


class PlatformError(RayplaneError):
    """The platform is not in the state an operation needs: nothing is up, a port is taken, a
    service did not start, a deployment failed."""


__all__ = ["PlatformError", "RayplaneError"]
