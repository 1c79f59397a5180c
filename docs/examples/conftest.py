pytest_plugins = ["gateway.testing"]  # the fixtures: start_backend, start_gateway, gateway_config
