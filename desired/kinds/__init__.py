"""Converters: one Kubernetes or Calico object (a plain dict) -> its model value."""
