"""``python -m mak`` (and ``torchrun -m mak``) entry point."""
import sys

from .cli import main

sys.exit(main())
