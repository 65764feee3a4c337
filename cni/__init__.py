"""The CNI plugin: pod set-up at creation time."""
