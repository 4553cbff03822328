"""Handlers of the `medsight` subcommands too large to sit beside the parser in `medsight.cli`, one module each.

`medsight.cli` parses every command's arguments (so that `--help` needs no torch) and maps errors to exit codes;
a handler here takes the parsed arguments and returns the exit code.
"""
