"""The subcommands of the `edgerun` CLI, one module each with add_parser(subparsers) and main(args)."""
