"""Sub-commands of the ``mak`` CLI, one module each; each defines ``register(subparsers)``."""
