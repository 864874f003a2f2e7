"""Servers and helpers the tests start for themselves on 127.0.0.1."""
