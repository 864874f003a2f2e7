"""The router: parses each fetched message, picks its campaign by the channel's
filters and publishes it to that campaign's queue."""
