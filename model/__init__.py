"""The typed models every stage shares: desired state, kernel state, selectors, names, errors.

Pure: no I/O, no imports from any other weft package.
"""
