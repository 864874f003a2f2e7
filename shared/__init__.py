"""Code every Mailroom service shares: messages, settings, schema, broker."""
