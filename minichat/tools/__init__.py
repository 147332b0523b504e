"""The operator's tools around the worker, each a subpackage with its plan, its I/O and its
rendering apart: `minichat simulate` (`simulator/`), `minichat replay` (`rebuild/`: it rebuilds the
state from the input log) and the books they check (`summary/`); `progress.py`, `tables.py` and
`kafka.py` are what they share. The bench (`minichat/bench/`) is a tool too, with a package of its
own. Nothing in `processors/` or below imports from here.
"""
