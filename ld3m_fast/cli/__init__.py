"""The `ld3m-fast` command line: one entry point, one module per subcommand."""
