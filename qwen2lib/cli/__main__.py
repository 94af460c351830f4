"""``python -m qwen2lib.cli``: the command line."""
import sys

from . import main

sys.exit(main())
