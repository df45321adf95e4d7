"""Response redaction: JSONPath fields and validated detectors over JSON, NDJSON, text, forms
and event streams (compressed or not), with reports of what was redacted — never the values.

    redactor = Redactor(RedactionSettings())
    plan = redactor.plan(decision.redact.fields, decision.redact.detectors)   # None: nothing to do
    body, report = await plan.redact_body_async(body, content_type=ct, content_encoding=ce)
"""

from .plan import Plan, Redactor
from .report import RedactionReport
from .scanner import DETECTORS, SCRUB_DETECTORS, SECRET_DETECTORS
from .scrub import scrub_text, scrub_value
from .settings import InvalidFieldPath, NotRedactable, RedactionSettings, UnknownDetector
from .sse import SseRedactor

__all__ = [
    "DETECTORS", "SCRUB_DETECTORS", "SECRET_DETECTORS",
    "InvalidFieldPath", "NotRedactable", "Plan", "RedactionReport", "RedactionSettings", "Redactor",
    "SseRedactor", "UnknownDetector", "scrub_text", "scrub_value",
]
