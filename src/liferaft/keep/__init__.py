"""Keep a run alive: the supervisor behind ``liferaft run`` and the in-process ``liferaft.attach``.

Modules: ``keeper`` (kept paths, restore before a start), ``syncer`` (background
snapshots at low priority), ``supervisor`` (the command, its signals, time caps and
restarts), ``session`` (``attach`` in a notebook or script), ``signals`` and ``units``.
Nothing here starts at import time.
"""
