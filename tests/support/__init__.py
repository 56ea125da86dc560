"""Shared by the tests: models, float64 references, event readers, a browser, a TensorBoard
server."""
