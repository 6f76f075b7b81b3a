"""Quota's domain: amounts of resources, instance types, group quotas and reservations."""
