"""Helpers for the integration tests: a conforming SSE parser, raw HTTP clients, processes."""
