"""Scipion workflow templates (``*.json.template``) of the PRIME plugin."""
