"""``python -m services.admin``: serve the admin API and console, as
``mailroom serve`` does (same options)."""

from services.admin.commands import serve

serve(prog_name="python -m services.admin")
