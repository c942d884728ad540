"""Command-line interface: parses options and calls the package; no logic of its own."""
