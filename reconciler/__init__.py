"""Reconciling: plan, apply and drift over the probed and the rendered state."""
