"""Command-line front end: ``repavit <command>``."""
