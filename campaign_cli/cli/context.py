"""The one context object every command receives (httpie's Environment, ours): built in the Typer
callback from the global options; tests build it directly. Nothing here runs at import time."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import typer

from campaign_cli.cli.output import Output, guarded
from campaign_cli.clock import Clock, SystemClock
from campaign_cli.store.db import Store, default_store_path, loose_permissions


@dataclass
class AppContext:
    output: Output = field(default_factory=Output)
    store_option: Path | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Clock = field(default_factory=SystemClock)
    _warned: bool = field(default=False, repr=False)

    @property
    def store_path(self) -> Path:
        return default_store_path(self.store_option, self.env)

    def open_store(self, *, create: bool = True) -> Store:
        store = Store.open(self.store_path, create=create)
        self.warn_if_exposed()
        return store

    def warn_if_exposed(self) -> None:
        """Once per command: a store other users can read (`loose_permissions`)."""
        if not self._warned:
            self._warned = True
            exposed = loose_permissions(self.store_path)
            if exposed is not None:
                self.output.warn(exposed)


F = TypeVar("F", bound=Callable[..., Any])

#: The end of the `--help` of every command but `send` and `validate` (which list their own):
#: the exit codes it can end with, as DESIGN.md section 5 and the README's table name them.
EXIT_CODES = ("Exit codes: 0 done; 1 internal error; 2 usage, configuration or input error "
              "(nothing changed); 130 interrupted by a signal.")


def command(fn: F) -> F:
    """Wrap a command: library errors become one line on stderr and their exit code.

    The command's first parameter must be the ``typer.Context``."""

    @functools.wraps(fn)
    def wrapper(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        app: AppContext = ctx.ensure_object(AppContext)
        return guarded(fn, app.output, ctx, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def app_context(ctx: typer.Context) -> AppContext:
    return ctx.ensure_object(AppContext)
