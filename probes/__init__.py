"""Probes: read back the kernel state weft owns, normalised as the kernel prints it."""
