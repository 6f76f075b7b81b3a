"""The scheduler service: deployments, their revisions and instances."""
