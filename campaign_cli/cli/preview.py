"""`campaign preview CAMPAIGN --row N`: one recipient's messages, as the run would send them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer

from campaign_cli.cli.context import EXIT_CODES, app_context, command
from campaign_cli.cli.output import one_line
from campaign_cli.cli.send import STOP_SIGNALS
from campaign_cli.cli.suppress import JsonOpt
from campaign_cli.config import load_campaign
from campaign_cli.models import (
    Content,
    EmailContent,
    PushContent,
    SmsContent,
    WebhookContent,
    from_micros,
)
from campaign_cli.pipeline import StopController
from campaign_cli.preview import WOULD_SEND, ChannelPreview, Preview, preview_row


def register(app: typer.Typer) -> None:
    app.command(
        "preview",
        epilog=EXIT_CODES,
        help="Show one recipient's messages as `campaign send` would send them: for each "
        "channel the address, whether it would be sent (or why not: suppressed, no consent, "
        "invalid, duplicate, render failed), the provider and cost, and the rendered text. "
        "Sends nothing and changes nothing in the store.",
    )(preview)


@command
def preview(
    ctx: typer.Context,
    campaign_file: Annotated[Path, typer.Argument(metavar="CAMPAIGN", show_default=False)],
    row: Annotated[int, typer.Option(
        "--row", help="The data row of the recipient file (from 1; the header is not a row).",
    )] = 1,
    recipients: Annotated[Optional[Path], typer.Option(
        "--recipients", "-r", help="Use this recipient CSV instead of the campaign's.",
        show_default=False,
    )] = None,
    run_key: Annotated[Optional[str], typer.Option(
        "--run-key", help="The run to preview in (default: derived from the recipient file, "
        "as `send` does): a row an earlier session of it decided is shown as decided.",
        show_default=False,
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    app = app_context(ctx)
    out = app.output
    loaded = load_campaign(campaign_file, app.env)
    out.secrets.update(loaded.secrets)
    stop = StopController()
    with _stopped_by_signals(stop):
        shown = preview_row(loaded, app.store_path, row, recipients=recipients,
                            run_key=run_key, clock=app.clock, stop=stop)
    for warning in shown.warnings:
        out.warn(warning)
    app.warn_if_exposed()
    if as_json:
        out.json(to_json(shown))
        return
    key = f", key {one_line(shown.key)}" if shown.key is not None else ""
    out.result(f"row {shown.row} (line {shown.line}{key}) in run {shown.run}")
    for channel in shown.channels:
        out.result(_headline(channel, shown.currency))
        if channel.detail:
            out.result(f"    {channel.detail}")
        if channel.content is not None:
            for text in _content_lines(channel.content):
                out.result(f"    {text}")
    if shown.stopped:
        out.result(f"(the dry run stopped before this row: {shown.stopped})")


@contextlib.contextmanager
def _stopped_by_signals(stop: StopController) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP stop the preview's dry run as they stop a send's (exit 130):
    its threads finish and its private copy of the store is removed. Uncaught, Ctrl-C cancelled
    the run mid-step (a policy thread still reading a connection being closed: a segfault now
    and then), and SIGTERM or SIGHUP killed the process: either way the copy, every address in
    the store, was left behind in the temporary folder. A signal this process was started
    ignoring stays ignored, as for `send`."""
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.request()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in the dry run (reading the campaign, rendering): stop here
            raise KeyboardInterrupt from None
        loop.call_soon_threadsafe(lambda: None)  # wake the loop to see the stop

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _headline(channel: ChannelPreview, currency: str) -> str:
    address = channel.address or "-"
    if channel.outcome == WOULD_SEND:
        via = " -> ".join(channel.providers)
        return (f"{channel.channel} {address}: would send via {via}, cost "
                f"{from_micros(channel.cost_micros)} {currency}")
    reason = f" ({channel.reason})" if channel.reason and channel.reason != channel.outcome \
        else ""
    already = " (already, in an earlier session of this run)" if channel.already else ""
    return f"{channel.channel} {address}: {channel.outcome}{reason}{already}"


def _content_lines(content: Content) -> list[str]:
    if isinstance(content, SmsContent):
        return [f"[{content.encoding}, {content.segments} segment"
                f"{'s' if content.segments != 1 else ''}]", *content.body.splitlines()]
    if isinstance(content, EmailContent):
        lines = [f"From: {content.sender}"]
        if content.reply_to:
            lines.append(f"Reply-To: {content.reply_to}")
        lines += [f"{name}: {value}" for name, value in content.headers]
        lines.append(f"Subject: {content.subject}")
        if content.text is not None:
            lines += ["--- text ---", *content.text.splitlines()]
        if content.html is not None:
            lines += ["--- html ---", *content.html.splitlines()]
        return lines
    if isinstance(content, PushContent):
        lines = [f"Title: {content.title}", *content.body.splitlines()]
        lines += [f"data {name}: {value}" for name, value in content.data.items()]
        return lines
    return content.text.splitlines()


def content_json(content: Content | None) -> dict[str, Any] | None:
    if content is None:
        return None
    if isinstance(content, SmsContent):
        return {"body": content.body, "encoding": content.encoding,
                "segments": content.segments}
    if isinstance(content, EmailContent):
        return {"from": content.sender, "reply_to": content.reply_to,
                "headers": dict(content.headers), "subject": content.subject,
                "text": content.text, "html": content.html}
    if isinstance(content, PushContent):
        return {"title": content.title, "body": content.body, "data": dict(content.data)}
    assert isinstance(content, WebhookContent)
    return {"text": content.text, "json": content.json}


def to_json(shown: Preview) -> dict[str, Any]:
    return {
        "run": shown.run, "row": shown.row, "line": shown.line, "key": shown.key,
        "currency": shown.currency, "stopped": shown.stopped, "warnings": shown.warnings,
        "channels": [
            {"channel": c.channel, "address": c.address, "outcome": c.outcome,
             "reason": c.reason, "detail": c.detail, "already": c.already,
             "providers": list(c.providers), "cost": str(from_micros(c.cost_micros)),
             "content": content_json(c.content)}
            for c in shown.channels
        ],
    }
