"""The exception tree of campaign-cli, and the exit codes it maps to.

    CampaignError                      exit 1 unless a subclass says otherwise
    ├── UsageError                     exit 2  a bad command line
    ├── InputError                     exit 2  a bad file: names file, line and field
    │   └── ConfigError                exit 2  the campaign YAML (or a template it names)
    ├── StoreError                     exit 2  the store cannot be opened or is too new
    ├── JournalError                   exit 1  writing the journal failed mid-run
    ├── NotSentError                   exit 1  a provider cannot take messages any more
    ├── ReaderProcessError             exit 1  the recipient reader process died (resumable)
    ├── RunLockedError                 exit 5  another process drives this run
    ├── StoppedBeforeStart             exit 130  a signal before the run started: nothing done
    └── ProviderError                  raised by provider adapters; the pipeline decides by class
        ├── TransientError             retry with backoff (5xx, 408, resets before sending)
        │   └── RateLimitedError       retry after `retry_after` seconds; slows the provider
        ├── PermanentError             dead letter (`failed`), or `invalid` / suppress per action
        ├── InDoubtError               the request may have been delivered: the outcome is unknown
        └── ProviderAuthError          exit 6  credentials or configuration refused: abort the run

Exit codes are a contract (DESIGN.md section 5) and live in one enum, `ExitCode`. Run outcomes that
are not exceptions (spend cap, dead letters, interruption) are mapped in `pipeline.RunReport`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import IntEnum

REDACTED = "***"
_BREAKS_A_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so a secret containing
    another is not half-shown). Values shorter than 3 characters are not treated as secrets."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    return text


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    SPEND_CAP = 3
    FAILURES = 4
    LOCKED = 5
    PROVIDER_AUTH = 6
    INTERRUPTED = 130


class CampaignError(Exception):
    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(CampaignError):
    exit_code = ExitCode.USAGE


class ResumeRefused(UsageError):
    """A run the store holds, whose resume the campaign or command line no longer fits (another
    recipient file, purpose, ...): nothing is sent, and the run is named."""

    def __init__(self, message: str, *, campaign: str, run_key: str, run_id: int) -> None:
        super().__init__(message)
        self.campaign = campaign
        self.run_key = run_key
        self.run_id = run_id


class InputError(CampaignError):
    """Bad input, reported as ``FILE:LINE: field: message`` on one line."""

    exit_code = ExitCode.USAGE

    def __init__(self, file: str, line: int | None, field: str | None, message: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.field}: {self.message}" if self.field else \
            f"{where}: {self.message}"
        # A key or value quoted from the file may hold a line break or a CR: shown escaped.
        return _BREAKS_A_LINE.sub(lambda m: repr(m[0])[1:-1], text)


class ConfigError(InputError):
    pass


class StoreError(CampaignError):
    exit_code = ExitCode.USAGE


class JournalError(CampaignError):
    """The journal writer's transaction failed while a run was sending (a full disk, an I/O
    error): messages may have gone out, so this is not a "nothing sent" exit 2."""

    exit_code = ExitCode.INTERNAL


class NotSentError(CampaignError):
    """A provider could not take a message at all (its sending process is gone): nothing left.
    The run stops (exit 1) and the row stays as it was before the attempt, for the resume."""

    exit_code = ExitCode.INTERNAL


class ReaderProcessError(CampaignError):
    """The child process reading the recipient file died or stopped making sense (killed, out
    of memory): not a bug of ours to report, and nothing is lost. The run stops; a resume reads
    on from the first open row."""

    exit_code = ExitCode.INTERNAL


class StoppedBeforeStart(CampaignError):
    """A stop (Ctrl-C, SIGTERM) arrived while the run was being prepared (the recipient file
    checked, providers started): nothing was sent and no session recorded."""

    exit_code = ExitCode.INTERRUPTED


class RunLockedError(CampaignError):
    exit_code = ExitCode.LOCKED

    def __init__(self, run: str, holder: str) -> None:
        self.run = run
        self.holder = holder
        super().__init__(f"run {run} is being sent by another process ({holder})")


class ProviderError(CampaignError):
    """A provider's answer, translated. ``code`` and ``text`` are the provider's own."""

    def __init__(
        self, text: str, *, code: str | None = None, status: int | None = None
    ) -> None:
        self.text = text
        self.code = code
        self.status = status
        super().__init__(f"{code}: {text}" if code else text)


class TransientError(ProviderError):
    def __init__(
        self,
        text: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(text, code=code, status=status)
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    pass


class PermanentError(ProviderError):
    """A definite refusal. ``action`` asks for a side effect: ``"invalid"`` ends the row
    `invalid` rather than `failed`; ``"suppress"`` also adds the address to the suppression list.
    ``answered=False``: refused here, before anything left (a message the adapter cannot build,
    a recipient's URL that may not be reached), so it says nothing of the provider's health."""

    def __init__(
        self,
        text: str,
        *,
        code: str | None = None,
        status: int | None = None,
        action: str | None = None,
        answered: bool = True,
    ) -> None:
        super().__init__(text, code=code, status=status)
        self.action = action
        self.answered = answered


class InDoubtError(ProviderError):
    pass


class ProviderAuthError(ProviderError):
    exit_code = ExitCode.PROVIDER_AUTH
