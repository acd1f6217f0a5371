"""CLI subcommands, one module each (see slm_fast/cli.py)."""
