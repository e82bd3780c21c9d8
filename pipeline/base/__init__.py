"""Base: the params, the one-line errors, files written whole, the network and its weights' files,
and the project's own import graph."""
