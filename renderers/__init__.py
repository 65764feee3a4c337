"""Renderers: pure functions from the desired model to the kernel state this node should have."""
