"""The sender: composes outbound email and delivers it over SMTP."""
