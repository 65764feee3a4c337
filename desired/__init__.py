"""Desired state: what the cluster says this node should have, as one typed immutable model."""
