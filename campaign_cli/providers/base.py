"""The provider protocol: one async method that sends one message.

An adapter translates its transport's answers into `SendResult` (accepted) or one of the error
classes of `campaign_cli.errors` (TransientError, RateLimitedError, PermanentError, InDoubtError,
ProviderAuthError); the pipeline decides retry, dead letter or abort from the class alone. Adapters
know nothing of the store, the journal or the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

from campaign_cli.clock import Clock
from campaign_cli.errors import ProviderError
from campaign_cli.models import Channel, OutboundMessage, SendResult


@runtime_checkable
class Provider(Protocol):
    name: str
    channels: frozenset[Channel]
    #: True when a resend with the same idempotency key can never deliver twice. The pipeline
    #: re-sends in-doubt messages only to such providers (or when the campaign says `resend`).
    deduplicates: bool
    # Optional, read with getattr (default False): ``refusals_mean_config = True`` says that the
    # provider's own endpoint answers for every message (Twilio, SendGrid, FCM), so the same
    # permanent refusal ten times in a row is our configuration, not the recipients: the
    # pipeline stops the run with exit 6 instead of dead-lettering the whole list.
    # Optional, read with getattr (default False): ``local = True`` says that its messages never
    # leave this machine (console, outbox). A run whose providers are all local commits its
    # journal without syncing each commit to disk; any other provider makes every commit durable
    # (`campaign_cli.store.db.connect`), so that no power cut can lose an intent whose message left.

    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BatchProvider(Provider, Protocol):
    """A provider that can take many messages in one call: the local ones (console, outbox), where
    a message costs microseconds and one call per message would cost more than the message.

    The pipeline hands it up to ``batch_size`` messages whose `sending` intents are already
    committed, and only when the provider is unthrottled and the channel has no failover; paced or
    failover traffic goes through `send` one message at a time. ``send_batch`` returns one entry
    per message, in order: a `SendResult` (accepted) or a `ProviderError` instance (that message
    failed; the pipeline retries or records it exactly as if `send` had raised it). A
    `ProviderError` *raised* by ``send_batch`` is that answer for every message of the batch (an
    outbox folder that cannot be made: nothing written, the configuration refused). Any other
    exception means it is not known which messages left: all of them end `in_doubt` and the run
    stops, as for a bug in `send`."""

    batch_size: int

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]: ...


@dataclass
class ProviderContext:
    """What a provider factory may use: the clock, the run's name (for file and id naming),
    the stream the console provider writes to, and where HTTP exchanges happen."""

    clock: Clock
    run_name: str
    stdout: IO[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: Makes an HTTP provider's transport for a pool of that many connections, when the run
    #: sends HTTP from another process (`campaign_cli.providers.process`); None: in process.
    transports: Callable[[int], Any] | None = None
    #: Whether a message's address may be the recipient's own URL (the recipient file has a
    #: ``webhook_url`` column). False: a webhook message's address is the recipient's key, which
    #: is anyone's text however much it looks like a URL; every message goes to the provider's.
    recipient_urls: bool = True


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


#: The provider types that send over HTTP (`campaign_cli.providers.http`): a run that uses one
#: sends their requests from a second process (`campaign_cli.providers.process`).
HTTP_TYPES = frozenset({"twilio", "sendgrid", "fcm", "slack", "webhook"})

#: Provider types and where their classes live. Imported only when a run uses the type, so an
#: outbox run never pays for aiohttp, aiosmtplib or PyJWT.
BUILTIN_PROVIDERS: dict[str, str] = {
    "outbox": "campaign_cli.providers.outbox:OutboxProvider",
    "console": "campaign_cli.providers.console:ConsoleProvider",
    "twilio": "campaign_cli.providers.twilio:TwilioProvider",
    "sendgrid": "campaign_cli.providers.sendgrid:SendGridProvider",
    "smtp": "campaign_cli.providers.smtp:SmtpProvider",
    "fcm": "campaign_cli.providers.fcm:FcmProvider",
    "slack": "campaign_cli.providers.slack:SlackProvider",
    "webhook": "campaign_cli.providers.webhook:WebhookProvider",
}


def _lazy(target: str) -> ProviderFactory:
    module_name, _, class_name = target.partition(":")

    def factory(name: str, config: Any, context: ProviderContext) -> Provider:
        import importlib

        cls = getattr(importlib.import_module(module_name), class_name)
        provider: Provider = cls.from_config(name, config, context)
        return provider

    return factory


def type_deduplicates(type_name: str) -> bool:
    """Whether a built-in provider type drops a second copy sent with the same idempotency key
    (its class says ``deduplicates``), without building one: a dry run needs to know which
    in-doubt messages the real run would send again. False for a type that is not built in."""
    target = BUILTIN_PROVIDERS.get(type_name)
    if target is None:
        return False
    import importlib

    module_name, _, class_name = target.partition(":")
    return bool(getattr(getattr(importlib.import_module(module_name), class_name),
                        "deduplicates", False))


def default_registry() -> ProviderRegistry:
    registry = ProviderRegistry()
    for type_name, target in BUILTIN_PROVIDERS.items():
        registry.register(type_name, _lazy(target))
    return registry
