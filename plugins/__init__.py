"""Built-in plugins. Each is an ordinary plugin, enabled by naming it in gateway.yaml."""
