"""Mailroom's benchmarks: `.venv/bin/python -m benchmarks` (or `make bench`).

Each of router, publishing, poller, sender, large_mail and latency measures
one part of the pipeline against a baseline taken in the same run; report
prints them as one table. The others serve them: environment makes and
removes the database, broker prefix and servers, mail and mailbox the mail
and mailboxes, workers runs a real worker, sink is the SMTP server, memory
measures one large message in a fresh process. parsing is a separate script
comparing the router's parser with the standard library's.
"""
