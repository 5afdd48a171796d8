"""``python -m edgemerge``: the same as the ``edgemerge`` command."""

from .cli import main

main()
