"""One module per stage; each has ``register(subparsers)`` adding its subcommands."""
