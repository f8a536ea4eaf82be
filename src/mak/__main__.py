"""``python -m mak`` (and ``torchrun -m mak``) entry point."""
import sys

from mak.cli import main

sys.exit(main())
