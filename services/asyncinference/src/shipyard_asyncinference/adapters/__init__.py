"""The service's edges: the JetStream work queue and the gateway that runs requests."""
