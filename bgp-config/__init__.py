"""BIRD configuration templates (jinja2), shipped with weft as package data: renderers.bird
loads them with importlib.resources, so an installed weft finds them wherever it is."""
