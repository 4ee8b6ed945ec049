"""Notifications delivered from the outbox: e-mail over SMTP (welcome mail, code mails)."""
