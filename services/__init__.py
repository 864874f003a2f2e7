"""The Mailroom processes: poller, router, sender and the admin tools."""
