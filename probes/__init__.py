"""Probes: read back the kernel state weft owns, normalised as the kernel prints it.

Importing this package costs nothing: the CNI plugin's hot path uses probes.backend and
probes.runner alone. The engine (reconciler.engine) runs the full reads, one resource each.
"""
