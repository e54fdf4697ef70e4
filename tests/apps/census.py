"""tests/apps/rooms.py with tracemalloc started at import, for the memory census of hibernation.

A separate app (and server process) so that tracing slows down only the test that needs it.
"""

import tracemalloc

tracemalloc.start()

from tests.apps.rooms import app  # noqa: E402

__all__ = ["app"]
