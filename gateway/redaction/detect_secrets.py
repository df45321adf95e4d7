"""Secret detectors: AWS keys, PEM private keys, JWTs, bearer tokens, generic API keys.

The vendor patterns follow detect-secrets' plugins (AWSKeyDetector, GitHubTokenDetector,
GitLabTokenDetector, SlackDetector, StripeDetector, OpenAIDetector, PypiTokenDetector,
SendGridDetector, TwilioKeyDetector, MailchimpDetector, SquareOAuthDetector,
TelegramBotTokenDetector, JwtTokenDetector, PrivateKeyDetector, BasicAuthDetector,
KeywordDetector), written here as anchored patterns that yield spans: detect-secrets itself
returns matched strings rather than positions, needs its global settings, costs ~25 µs per
string for the regex plugins alone (~480 µs per line for ``scan_line``), and its JWT pattern
stops before the signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

Span = tuple[int, int, str]

# --- AWS -------------------------------------------------------------------------------------
_AWS_ID = re.compile(r"(?<![A-Za-z0-9])(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])", re.ASCII)
_AWS_SECRET = re.compile(
    r"(?ai)aws.{0,20}?(?:secret|key|pwd|pw|password|pass|token).{0,20}?[=:'\"\s]([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)


def find_aws_access_key(s: str, nd: int = 0, low: str = "") -> list[Span]:
    out: list[Span] = []
    if len(s) < 20:
        return out
    if "A" in s and ("AKIA" in s or "ASIA" in s or "ABIA" in s or "ACCA" in s or "A3T" in s):
        out.extend((m.start(), m.end(), m.group()) for m in _AWS_ID.finditer(s))
    if "aws" in (low or s.lower()):
        out.extend((m.start(1), m.end(1), m.group(1)) for m in _AWS_SECRET.finditer(s))
    return out


# --- PEM private keys ------------------------------------------------------------------------
_PEM_BEGIN = re.compile(r"-{4,5} ?BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)? ?-{4,5}", re.ASCII)
_PEM_END = re.compile(r"-{4,5} ?END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)? ?-{4,5}", re.ASCII)


def find_private_key(s: str, nd: int = 0, low: str = "") -> list[Span]:
    """A whole PEM block; a block with no END line is redacted to the end of the string."""
    if "PRIVATE KEY" not in s:
        return []
    out: list[Span] = []
    pos = 0
    while (m := _PEM_BEGIN.search(s, pos)) is not None:
        end = _PEM_END.search(s, m.end())
        stop = end.end() if end is not None else len(s)
        out.append((m.start(), stop, s[m.start():stop]))
        pos = stop
    return out


# --- JWT -------------------------------------------------------------------------------------
_B64URL = r"[A-Za-z0-9_\-]"
# Starts only at a token boundary (or after a URL-encoded quote / '='), which keeps the scan
# linear on hostile input such as "eyJeyJeyJ...".
_JWT = re.compile(
    rf"(?a)(?:(?<![A-Za-z0-9_\-])|(?<=%22)|(?<=%3[Dd]))"
    rf"eyJ{_B64URL}++={{0,2}}\.{_B64URL}++={{0,2}}\.{_B64URL}*+={{0,2}}(?:\.{_B64URL}++\.{_B64URL}++)?"
)


def _b64_json_object(part: str) -> bool:
    if len(part) > 4096:
        return False
    part = part.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        return isinstance(json.loads(raw), dict)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False


def find_jwt(s: str, nd: int = 0, low: str = "") -> list[Span]:
    """JWS (3 parts, possibly empty signature) and JWE (5 parts) whose header is a JSON object."""
    if "eyJ" not in s:
        return []
    return [(m.start(), m.end(), m.group()) for m in _JWT.finditer(s)
            if _b64_json_object(m.group().split(".", 1)[0])]


# --- bearer tokens ---------------------------------------------------------------------------
_BEARER = re.compile(r"(?i)(?<![A-Za-z0-9])bearer(?:\s+|%20|\+)([A-Za-z0-9\-._~+/]+=*)", re.ASCII)
_TOKENISH = frozenset("0123456789-._~+/=")


def find_bearer_token(s: str, nd: int = 0, low: str = "") -> list[Span]:
    """The credential after ``Bearer`` (the word itself stays). Prose ("bearer of") is left alone."""
    if "bearer" not in (low or s.lower()):
        return []
    out = []
    for m in _BEARER.finditer(s):
        tok = m.group(1)
        if len(tok) >= 24 or (len(tok) >= 8 and any(c in _TOKENISH for c in tok)):
            out.append((m.start(1), m.end(1), tok))
    return out


# --- generic API keys and secrets ------------------------------------------------------------
_VENDOR = re.compile(
    r"(?a)(?<![A-Za-z0-9_\-])(?:"
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36,255}"  # GitHub
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|xox[aboprs]-(?:[0-9]+-)+[A-Za-z0-9]+"  # Slack
    r"|https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+"
    r"|(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,}|whsec_[A-Za-z0-9]{24,}"  # Stripe
    r"|sk-(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic (sk-proj-, sk-ant-)
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google
    r"|pypi-AgE[A-Za-z0-9_\-]{50,}"  # PyPI
    r"|npm_[A-Za-z0-9]{36}"  # npm
    r"|SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"  # SendGrid
    r"|(?:AC|SK)[a-f0-9]{32}"  # Twilio
    r"|[0-9a-f]{32}-us[0-9]{1,2}"  # Mailchimp
    r"|sq0(?:atp|csp)-[0-9A-Za-z_\-]{22,43}"  # Square
    r"|hf_[A-Za-z0-9]{34,}"  # Hugging Face
    r"|[0-9]{8,10}:AA[0-9A-Za-z_\-]{33}"  # Telegram bot
    r")(?![A-Za-z0-9_\-])"
)
_KEYWORDS = (
    r"api[_\-]?key|apikey|api[_\-]?secret|api[_\-]?token|client[_\-]?secret|secret[_\-]?key"
    r"|access[_\-]?key|access[_\-]?token|refresh[_\-]?token|auth[_\-]?token|session[_\-]?token"
    r"|id[_\-]?token|private[_\-]?key|password|passwd|passphrase|pwd|secret"
)
# ``password=...`` / ``"api_key": "..."`` / ``token=...`` (but not ``next_page_token=...``).
_ASSIGN = re.compile(
    rf"(?ai)(?:(?<![A-Za-z0-9])(?:{_KEYWORDS})|(?<![A-Za-z0-9_.\-])token)"
    r"[\"']?\s{0,3}[:=]\s{0,3}[\"']?([^\s\"'&,;<>]{4,})"
)
_NOT_SECRETS = frozenset({"true", "false", "null", "none", "undefined", "required", "optional", "string"})
_BASIC = re.compile(r"(?i)(?<![A-Za-z0-9])basic(?:\s+|%20|\+)([A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])", re.ASCII)
_URL_USERINFO = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]+:([^\s/@]+)@", re.ASCII)


def _basic_credentials(tok: str) -> bool:
    try:
        raw = base64.b64decode(tok + "=" * (-len(tok) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return b":" in raw and raw.isascii()


def _vendor_hint(s: str) -> bool:
    """Every vendor pattern above contains one of these literals: a cheap gate before the regex."""
    return ("_" in s or "AC" in s or "SK" in s or "AIza" in s or "SG." in s or ":AA" in s
            or ("-" in s and ("gl" in s or "xox" in s or "sk-" in s or "pypi-" in s or "sq0" in s or "-us" in s)))


def _assign_hint(low: str) -> bool:
    return "key" in low or "secret" in low or "token" in low or "pass" in low or "pwd" in low


def find_api_key(s: str, nd: int = 0, low: str = "") -> list[Span]:
    if len(s) < 8:
        return []
    low = low or s.lower()
    out: list[Span] = []
    if _vendor_hint(s):
        out.extend((m.start(), m.end(), m.group()) for m in _VENDOR.finditer(s))
    if ("=" in s or ":" in s) and _assign_hint(low):
        for m in _ASSIGN.finditer(s):
            v = m.group(1)
            if v.lower() not in _NOT_SECRETS and not v.startswith("[REDACTED"):
                out.append((m.start(1), m.end(1), v))
    if "://" in s and "@" in s:
        out.extend((m.start(1), m.end(1), m.group(1)) for m in _URL_USERINFO.finditer(s))
    if "basic" in low:
        out.extend((m.start(1), m.end(1), m.group(1)) for m in _BASIC.finditer(s)
                   if _basic_credentials(m.group(1)))
    return out


# JSON members / form fields whose *name* says the value is a secret.
_SECRET_NAME_SUFFIXES = (
    "password", "passwd", "passphrase", "secret", "apikey", "apisecret", "apitoken", "secretkey",
    "accesskey", "privatekey", "accesstoken", "refreshtoken", "authtoken", "sessiontoken", "idtoken",
    "bearertoken", "clientsecret", "credential", "credentials", "authorization",
)
_SECRET_NAMES = frozenset({"token", "pwd", "auth", "cookie", "setcookie", "sessionid", "xauthtoken"})
_NAME_CACHE: dict[str, bool] = {}
_NAME_CACHE_MAX = 4096


def is_secret_name(name: str) -> bool:
    """``client_secret``, ``db-password``, ``apiKey``, ``Authorization`` ... (not ``next_page_token``)."""
    hit = _NAME_CACHE.get(name)
    if hit is None:
        n = name.lower().replace("_", "").replace("-", "").replace(".", "").replace(" ", "")
        hit = n in _SECRET_NAMES or n.endswith(_SECRET_NAME_SUFFIXES)
        if len(_NAME_CACHE) >= _NAME_CACHE_MAX:
            _NAME_CACHE.clear()
        _NAME_CACHE[name] = hit
    return hit
