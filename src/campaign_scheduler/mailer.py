"""Sending email over SMTP (aiosmtplib), with errors sorted into retry / do not retry."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from .config import Settings
from .errors import NonRetryableError


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: EmailMessage) -> None:
        s = self.settings
        try:
            await aiosmtplib.send(
                message,
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username,
                password=s.smtp_password,
                use_tls=s.smtp_tls,
                start_tls=s.smtp_starttls,
                timeout=s.smtp_timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise NonRetryableError(f"the mail server refused the recipient: {exc}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:  # permanent failure: retrying sends the same thing
                raise NonRetryableError(f"the mail server said {exc.code} {exc.message}") from exc
            raise  # 4xx: temporary, BullMQ retries with backoff
        # Connection errors and timeouts propagate: temporary, retried.
