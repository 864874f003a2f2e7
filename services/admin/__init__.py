"""Tools of platform operators and workspace administrators: the CLI."""
