"""Command-line options of ``python -m bench``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

CONFIGS = ("direct", "direct-tls", "route", "route-new", "route-fsync", "redact", "redact-large", "forward", "mitm",
           "lag")
"""Configurations in run order (``--only`` picks among them)."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    duration: float = 10.0
    connections: int = 32
    requests: int = 500_000
    only: tuple[str, ...] = CONFIGS
    smoke: bool = False
    generator: str = "auto"
    pin: bool = True
    out: Path = RESULTS_DIR
    warmup_requests: int = 1_000
    lag_rate: float = 1_000.0
    lag_seconds: float = 10.0
    lag_samples_per_second: float = 4.0
    leak: bool = False
    leak_only: bool = False
    leak_requests: int = 1_000_000
    leak_seconds: float = 3_600.0
    profile_seconds: float = 0.0
    profile_config: str = "route"
    leak_config: str = "route"
    keep: bool = False
    large_bytes: int = 1_000_000
    """redact-large: size of the JSON response (bytes)."""
    large_requests: int = 30
    """redact-large: sequential calls each, with and without redaction."""
    large_seconds: float = 60.0
    """redact-large: time bound of the sequential calls (both kinds together)."""
    large_background: int = 2
    """redact-large: large redacted calls kept running during the small-request phase."""
    small_connections: int = 8
    """redact-large: connections of the small GETs."""

    def apply_smoke(self) -> None:
        """A few hundred requests per configuration, each phase also cut at 1 s (the smoke run
        must stay well under a minute even when the gateway is slow): proves everything runs."""
        self.duration = min(self.duration, 1.0)
        self.requests = min(self.requests, 100)
        self.warmup_requests = min(self.warmup_requests, 16)
        self.lag_seconds = min(self.lag_seconds, 0.5)
        self.lag_samples_per_second = max(self.lag_samples_per_second, 6.0)
        self.leak = True
        self.leak_requests = min(self.leak_requests, 500)
        self.leak_seconds = min(self.leak_seconds, 2.0)
        self.large_bytes = min(self.large_bytes, 100_000)  # still above the redactor's thread threshold
        self.large_requests = min(self.large_requests, 3)
        self.large_seconds = min(self.large_seconds, 5.0)


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark agentgate against its upstream on 127.0.0.1 (results in bench/results/).")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load phase (default 10)")
    p.add_argument("--connections", type=int, default=32, help="connections of the loaded phases (default 32)")
    p.add_argument("--requests", type=int, default=500_000, help="request cap per load phase (default 500000)")
    p.add_argument("--only", default=",".join(CONFIGS),
                   help=f"comma-separated configurations to run, of: {', '.join(CONFIGS)}")
    p.add_argument("--smoke", action="store_true",
                   help="a few hundred requests per configuration (and a tiny --leak): checks that all run")
    p.add_argument("--generator", choices=("auto", "wrk", "builtin"), default="auto",
                   help="load generator where wrk can be used (default: wrk when installed)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where latest.json / latest.md go")
    p.add_argument("--lag-rate", type=float, default=1_000.0, help="req/s of the audit-lag phase (default 1000)")
    p.add_argument("--lag-seconds", type=float, default=10.0, help="length of the audit-lag phase (default 10)")
    p.add_argument("--leak", action="store_true",
                   help="leak mode: gateway RSS after N route requests vs after N/10 (runs only that)")
    p.add_argument("--leak-requests", type=int, default=1_000_000, help="N of --leak (default 1000000)")
    p.add_argument("--leak-seconds", type=float, default=3_600.0, help="time bound of --leak (default 3600)")
    p.add_argument("--leak-config", choices=("route", "route-new"), default="route",
                   help="the configuration --leak loads (default route; route-new: every decision evaluated)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="also profile the gateway under load with py-spy for SECONDS")
    p.add_argument("--profile-config", choices=("route", "forward"), default="route",
                   help="the configuration --profile loads (default route)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, chDB data)")
    p.add_argument("--large-bytes", type=int, default=1_000_000,
                   help="redact-large: size of the JSON response in bytes (default 1000000)")
    p.add_argument("--large-requests", type=int, default=30,
                   help="redact-large: sequential calls with and without redaction, each (default 30)")
    p.add_argument("--small-connections", type=int, default=8,
                   help="redact-large: connections of the small GETs (default 8)")
    a = p.parse_args(argv)
    only = tuple(c.strip() for c in a.only.split(",") if c.strip())
    unknown = [c for c in only if c not in CONFIGS]
    if unknown:
        p.error(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if a.duration <= 0 or a.connections < 1 or a.requests < 1 or a.leak_requests < 10 or a.lag_rate <= 0:
        p.error("--duration, --connections, --requests, --lag-rate must be positive; --leak-requests >= 10")
    if not 1_000 <= a.large_bytes <= 16 << 20 or a.large_requests < 1 or a.small_connections < 1:
        p.error("--large-bytes must be in 1000..16777216; --large-requests, --small-connections positive")
    opts = Options(duration=a.duration, connections=a.connections, requests=a.requests,
                   only=tuple(c for c in CONFIGS if c in only), smoke=a.smoke, generator=a.generator,
                   pin=a.pin, out=a.out, lag_rate=a.lag_rate, lag_seconds=a.lag_seconds, leak=a.leak,
                   leak_requests=a.leak_requests, leak_seconds=a.leak_seconds, profile_seconds=a.profile,
                   profile_config=a.profile_config, leak_config=a.leak_config,
                   keep=a.keep, leak_only=a.leak and not a.smoke, large_bytes=a.large_bytes,
                   large_requests=a.large_requests, small_connections=a.small_connections)
    if opts.smoke:
        opts.apply_smoke()
    return opts
