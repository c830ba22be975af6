"""``python -m nca_fast``: the same as the ``nca-fast`` command."""
import sys

from .cli import main

sys.exit(main())
