"""Prefect flows (composition only) and the ``diffquant`` CLI."""
