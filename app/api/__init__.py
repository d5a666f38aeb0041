"""HTTP layer: routes only translate between HTTP and the services."""
