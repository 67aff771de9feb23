"""The treeguard pytest plugin (issue 5)."""
