"""Notifications delivered from the outbox: the welcome e-mail over SMTP."""
