"""Cinder volume driver for Ember agents (emberd)."""
