"""Channels: the upstream accounts a model can be served by (docs/channels.md)."""
