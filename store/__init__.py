"""The node store: the state dir and everything weft keeps in it (lock, IPAM records, the CNI
snapshot, the desired-state cache), checked and written safely. Nothing else touches those files.
"""
