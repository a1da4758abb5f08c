"""Shared helpers for the bench scripts: generated recipient files and campaign files."""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "out"

# Measure the package as an installed wheel runs it: pip writes its bytecode at install time,
# but an editable install under PYTHONDONTWRITEBYTECODE=1 (as on the machine these figures come
# from) compiles every module from source on every start, ~0.1 s per process measured with
# callgrind (2.84 G instructions to start a 1-row dry run with bytecode, 3.17 G without).
compileall.compile_dir(Path(__file__).resolve().parent.parent / "campaign_cli", quiet=1)


def recipients(n: int) -> Path:
    """A CSV of n distinct valid recipients (generated once, reused)."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"recipients-{n}.csv"
    if path.exists():
        return path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two benches may make the same file at once
    with tmp.open("w", encoding="utf-8") as f:
        f.write("id,first_name,phone,email\n")
        for i in range(n):
            # NANP numbers 201-2XX-XXXX are valid; 10 exchanges x 10,000 lines per million.
            exchange = 200 + i // 10_000 % 800
            area = 201 + (i // 8_000_000) * 2
            f.write(f"c{i},Name{i % 997},+1{area}{exchange:03d}{i % 10_000:04d},"
                    f"p{i}@example.com\n")
    os.replace(tmp, path)
    return path


def campaign(name: str, csv_path: Path, provider: dict[str, object], *,
             concurrency: int = 64) -> Path:
    OUT.mkdir(exist_ok=True)
    data = {
        "name": name,
        "purpose": "transactional",
        "recipients": {"file": str(csv_path), "key": "id", "columns": {"phone": "phone"}},
        "channels": {"sms": {"provider": "p",
                             "body": "Hi {{ first_name }}, your order {{ row }} has shipped."}},
        "providers": {"p": {**provider, "price_per_segment": "0.0079"}},
        "limits": {"concurrency": concurrency},
        "compliance": {"consent": "not_required"},
    }
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CAMPAIGN = [sys.executable, "-m", "campaign_cli"]


def end_to_end(campaign: Path, store: Path) -> tuple[float, dict[str, object]]:
    """`campaign send --json` as a subprocess on a fresh store: (wall seconds, its summary)."""
    for leftover in store.parent.glob(store.name + "*"):
        if leftover.is_file():
            leftover.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run([*CAMPAIGN, "--store", str(store), "--quiet", "send", str(campaign),
                           "--json"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"campaign send exit {proc.returncode}: {proc.stderr[-2000:]}")
    summary: dict[str, object] = json.loads(proc.stdout)
    return wall, summary


def reference() -> str:
    """How fast this machine runs our Python right now: microseconds to validate one phone number
    (phonenumbers, in this process, 20,000 numbers). This VM's speed drifts by 2x within an hour
    (bench/README.md, "Spread"), so every script prints this beside its figures: compare runs
    at similar reference values only. It calls the library itself (parse, validate, format), not
    `normalize_phone`, whose fast paths would make it a figure of our code instead of the
    machine."""
    import phonenumbers

    def normalize_phone(text: str) -> str:
        number = phonenumbers.parse(text, "US")
        assert phonenumbers.is_valid_number(number)
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    numbers = [f"+1201{200 + i // 10_000 % 800:03d}{i % 10_000:04d}" for i in range(20_000)]
    t0 = time.perf_counter()
    for number in numbers:
        normalize_phone(number)
    per = (time.perf_counter() - t0) / len(numbers) * 1e6
    return f"reference: {per:.1f} us per phone number validated (lower is a faster machine)"
