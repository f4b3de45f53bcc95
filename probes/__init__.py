"""Built-in probes, as TOML data files (see detaudit/probes.py for the format)."""
