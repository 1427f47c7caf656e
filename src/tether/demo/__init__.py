"""Offline demo helpers: a synthetic corpus and the pieces that let the demo run without a model hub."""
