"""The provider protocol: one async method that sends one message.

An adapter translates its transport's answers into `SendResult` (accepted) or one of the error
classes of `campaign_cli.errors` (TransientError, RateLimitedError, PermanentError, InDoubtError,
ProviderAuthError); the pipeline decides retry, dead letter or abort from the class alone. Adapters
know nothing of the store, the journal or the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

from campaign_cli.clock import Clock
from campaign_cli.models import Channel, OutboundMessage, SendResult


@runtime_checkable
class Provider(Protocol):
    name: str
    channels: frozenset[Channel]
    #: True when a resend with the same idempotency key can never deliver twice. The pipeline
    #: re-sends in-doubt messages only to such providers (or when the campaign says `resend`).
    deduplicates: bool

    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def aclose(self) -> None: ...


@dataclass
class ProviderContext:
    """What a provider factory may use: the clock, the run's name (for file and id naming),
    and the stream the console provider writes to."""

    clock: Clock
    run_name: str
    stdout: IO[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


ProviderFactory = Callable[[str, Any, ProviderContext], Provider]


class ProviderRegistry:
    """Provider factories by config ``type``. No module-level state: a run is handed a registry,
    and tests register fakes on their own instance."""

    def __init__(self) -> None:
        self._factories: dict[str, ProviderFactory] = {}

    def register(self, type_name: str, factory: ProviderFactory) -> None:
        self._factories[type_name] = factory

    def unregister(self, type_name: str) -> None:
        self._factories.pop(type_name, None)

    def create(self, name: str, config: Any, context: ProviderContext) -> Provider:
        try:
            factory = self._factories[config.type]
        except KeyError:
            raise KeyError(f"no provider type {config.type!r}") from None
        return factory(name, config, context)

    def types(self) -> list[str]:
        return sorted(self._factories)


def default_registry() -> ProviderRegistry:
    from campaign_cli.providers.console import ConsoleProvider
    from campaign_cli.providers.outbox import OutboxProvider

    registry = ProviderRegistry()
    registry.register("outbox", OutboxProvider.from_config)
    registry.register("console", ConsoleProvider.from_config)

    def twilio(name: str, config: Any, context: ProviderContext) -> Provider:
        from campaign_cli.providers.twilio import TwilioProvider

        return TwilioProvider.from_config(name, config, context)

    def sendgrid(name: str, config: Any, context: ProviderContext) -> Provider:
        from campaign_cli.providers.sendgrid import SendGridProvider

        return SendGridProvider.from_config(name, config, context)

    registry.register("twilio", twilio)
    registry.register("sendgrid", sendgrid)

    def smtp(name: str, config: Any, context: ProviderContext) -> Provider:
        # aiosmtplib is imported only by a run that sends through SMTP.
        from campaign_cli.providers.smtp import SmtpProvider

        return SmtpProvider.from_config(name, config, context)

    registry.register("smtp", smtp)

    def fcm(name: str, config: Any, context: ProviderContext) -> Provider:
        # PyJWT and cryptography are imported only by a run that sends through FCM.
        from campaign_cli.providers.fcm import FcmProvider

        return FcmProvider.from_config(name, config, context)

    from campaign_cli.providers.slack import SlackProvider
    from campaign_cli.providers.webhook import WebhookProvider

    registry.register("fcm", fcm)
    registry.register("slack", SlackProvider.from_config)
    registry.register("webhook", WebhookProvider.from_config)
    return registry
