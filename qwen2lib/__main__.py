"""``python -m qwen2lib``: the command line (the same as the ``qwen2lib`` script)."""
import sys

from .cli import main

sys.exit(main())
