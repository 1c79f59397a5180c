"""Example plugins that docs/plugins.md walks through."""
