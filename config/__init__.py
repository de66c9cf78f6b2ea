"""Deployment configuration of the example application."""
