"""The state server: a plain standard-library process that holds the shared state.

Nothing in this package imports Flask or the user's application: the server
only ever sees keys, numbers and opaque pickled blobs.
"""
