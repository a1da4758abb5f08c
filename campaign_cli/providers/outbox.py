"""The outbox provider: each message becomes one file, ``.eml`` for email and ``.json`` otherwise.

Files are named by the message's idempotency key and written atomically (temporary file, then
rename), so a resend of an in-doubt message replaces the same file: the outbox deduplicates, and a
crash never leaves half a message behind (the temporary files of a process killed mid-write are
removed when the next session opens the folder). Unthrottled runs hand it batches (`send_batch`): a
batch's files are written by one thread hop instead of one each.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from campaign_cli.config import OutboxProviderConfig
from campaign_cli.errors import ProviderAuthError, ProviderError
from campaign_cli.models import (
    Channel,
    EmailContent,
    OutboundMessage,
    PushContent,
    SendResult,
    SmsContent,
    WebhookContent,
)
from campaign_cli.providers.base import ProviderContext
from campaign_cli.render.email import build_email, make_message_id


class OutboxProvider:
    channels = frozenset(Channel)
    deduplicates = True
    batch_size = 128
    local = True  # its output stays on this machine (`Provider`: the journal need not sync)

    def __init__(self, name: str, directory: Path, context: ProviderContext) -> None:
        self.name = name
        self._clock = context.clock
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", context.run_name)
        self.directory = directory / safe
        self._made = False

    @classmethod
    def from_config(
        cls, name: str, config: OutboxProviderConfig, context: ProviderContext
    ) -> OutboxProvider:
        return cls(name, config.dir, context)

    async def send(self, message: OutboundMessage) -> SendResult:
        await self._mkdir()  # ProviderAuthError: the row goes back to pending, the run stops
        path, data = self._file(message)
        await asyncio.to_thread(_write_atomically, path, data)
        return SendResult(provider_message_id=path.name)

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        await self._mkdir()  # ProviderAuthError: the answer for the whole batch (base.py)
        files = [self._file(message) for message in messages]
        await asyncio.to_thread(_write_all, files)
        return [SendResult(provider_message_id=path.name) for path, _ in files]

    async def _mkdir(self) -> None:
        """Make the run's folder once. A folder that cannot be made or written is the campaign's
        configuration refused (exit 6, nothing written, rows still pending), not a message that
        may have gone out."""
        if not self._made:
            try:
                await asyncio.to_thread(_usable_directory, self.directory)
            except OSError as exc:
                raise ProviderAuthError(
                    f"outbox folder {self.directory} cannot be used: "
                    f"{exc.strerror or type(exc).__name__}", code="outbox_dir",
                ) from None
            self._made = True

    def _file(self, message: OutboundMessage) -> tuple[Path, bytes]:
        content = message.content
        if isinstance(content, EmailContent):
            data = build_email(
                content,
                to=message.address,
                message_id=make_message_id(message.idempotency_key, "outbox.invalid"),
                date=self._clock.now(),
            )
            suffix = ".eml"
        else:
            data = json.dumps(_payload(message), ensure_ascii=False, indent=1).encode() + b"\n"
            suffix = ".json"
        return self.directory / f"{message.idempotency_key}{suffix}", data

    async def aclose(self) -> None:
        return None


def _payload(message: OutboundMessage) -> dict[str, Any]:
    content = message.content
    base: dict[str, Any] = {
        "channel": message.channel._value_,  # (an attribute; .value is a slow property)
        "to": message.address,
        "recipient_key": message.recipient_key,
        "idempotency_key": message.idempotency_key,
    }
    if isinstance(content, SmsContent):
        base.update(body=content.body, encoding=content.encoding, segments=content.segments)
    elif isinstance(content, PushContent):
        base.update(title=content.title, body=content.body, data=dict(content.data))
    elif isinstance(content, WebhookContent):
        base.update(text=content.text)
        if content.json:  # what the `webhook` provider would send: the object, as `data`
            base.update(data=json.loads(content.text))
    return base


def _usable_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(13, "not writable", str(directory))
    _remove_stale_temporaries(directory)


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files of writers that died mid-write (SIGKILL, a power cut). Each
    holds a message (personal data) whose row was left in doubt, and this session writes it
    again under its own name. A live process's file is left alone: another run whose folder has
    the same name may be writing it."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                found = _TEMPORARY.fullmatch(entry.name)
                if found is not None and not _alive(int(found[1])):
                    Path(entry.path).unlink(missing_ok=True)
    except OSError:
        pass  # a leftover is untidy, not a reason to stop: the folder is usable


_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")  # as `_write_atomically` names them


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or no pid at all): leave it be
    return True


def _write_all(files: Sequence[tuple[Path, bytes]]) -> None:
    for path, data in files:
        _write_atomically(path, data)


def _write_atomically(path: Path, data: bytes) -> None:
    # A new file (O_EXCL: never through a symlink) under a name nobody can guess: the folder may
    # be shared, and a link planted at a predictable name would have the message written into
    # whatever file it points to. The pid ends the name, for `_remove_stale_temporaries`.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp",
                                dir=path.parent)
    tmp = Path(name)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than it was given (a full disk, first of all)
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left beside the messages
        raise
