"""The poller: reads channels' mailboxes and publishes what arrived."""
