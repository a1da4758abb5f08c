"""Shared fixtures: a campaign in a temporary folder, built from a few parameters."""

from __future__ import annotations

import contextlib
import csv
import signal
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

Row = Sequence[str]
HEADER = ("id", "first_name", "phone", "email")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--third-party-deprecations", choices=("error", "warn"), default="error",
        help="warn: another library's DeprecationWarning is shown, not fatal (.ci/lowest runs the "
             "suite at the lowest versions pyproject.toml allows; newer libraries deprecate what "
             "older ones call). One raised in campaign_cli or tests stays an error.")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--third-party-deprecations") == "warn":
        # Later filterwarnings lines win over the ini's "error".
        for category in ("DeprecationWarning", "PendingDeprecationWarning"):
            config.addinivalue_line("filterwarnings", f"default::{category}")
            config.addinivalue_line("filterwarnings",
                                    rf"error::{category}:(campaign_cli|tests)(\.|$)")


def phone(i: int) -> str:
    """A distinct valid US number for recipient i (NANP 201 area code, 2xx exchange)."""
    return f"+1201{200 + i // 10000:03d}{i % 10000:04d}"


def write_csv(path: Path, rows: Iterable[Row], header: Row = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def people(n: int, start: int = 1) -> list[list[str]]:
    return [[f"c{i}", f"Name{i}", phone(i), f"person{i}@example.com"]
            for i in range(start, start + n)]


class CampaignFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.outbox = root / "outbox"

    def __call__(
        self,
        rows: Iterable[Row] | None = None,
        *,
        name: str = "test-campaign",
        purpose: str = "transactional",
        channels: dict[str, Any] | None = None,
        providers: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        compliance: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        header: Row = HEADER,
        file_name: str = "campaign.yaml",
    ) -> Path:
        csv_path = write_csv(self.root / "recipients.csv",
                             people(10) if rows is None else rows, header)
        data: dict[str, Any] = {
            "name": name,
            "purpose": purpose,
            "recipients": {"file": csv_path.name, "key": "id",
                           "columns": {"phone": "phone", "email": "email"}},
            "channels": channels or {"sms": {"provider": "box",
                                             "body": "Hi {{ first_name }}, your code is 1234."}},
            "providers": providers or {"box": {"type": "outbox", "dir": "outbox",
                                               "price_per_segment": "0.01"}},
            "limits": limits or {"concurrency": 4},
            "compliance": compliance or {"consent": "not_required"},
        }
        data.update(extra or {})
        path = self.root / file_name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path


@pytest.fixture
def make_campaign(tmp_path: Path) -> CampaignFactory:
    return CampaignFactory(tmp_path)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def journal(store: Path, run_id: int | None = None) -> list[dict[str, Any]]:
    conn = sqlite3.connect(store)
    conn.row_factory = sqlite3.Row
    try:
        sql = "SELECT * FROM messages"
        params: tuple[Any, ...] = ()
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params = (run_id,)
        return [dict(r) for r in conn.execute(sql + " ORDER BY row, channel", params)]
    finally:
        conn.close()


def checkpoint_truncates(path: Path) -> bool:
    """Whether another connection can checkpoint the store and reset its write-ahead log now,
    which it cannot while a read transaction of this process is open."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        other.close()
    return busy == 0


def query(store: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(store)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


Factory = Callable[..., Path]


@contextlib.contextmanager
def signals_as_a_terminal_leaves_them(*ignored: signal.Signals) -> Iterator[None]:
    """Children started inside get SIGINT and SIGHUP with their default action, as a program
    started from a terminal does, even when this test process was itself started ignoring them
    (under `nohup`, or as a script's background job: the children would inherit that, and
    `campaign` keeps an inherited ignore). ``ignored``: these are ignored instead, as `nohup`
    leaves SIGHUP."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.default_int_handler)
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@pytest.fixture
def opened_readers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every recipient reader child process (`ProcessChunkReader`) a run in the test opens."""
    import campaign_cli.pipeline as pipeline
    from campaign_cli.recipients import ProcessChunkReader

    readers: list[ProcessChunkReader] = []

    class Recorded(ProcessChunkReader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            readers.append(self)

    monkeypatch.setattr(pipeline, "ProcessChunkReader", Recorded)
    return readers
