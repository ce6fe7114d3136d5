"""The planner: which configuration fits and runs fastest, before any GPU is rented
(``python -m torchtitan_upipe.tools.plan``; see :mod:`.planner`).  :mod:`.search` searches
layouts and ``[memory]`` options, :mod:`.speed` predicts step times, :mod:`.plot` draws."""
