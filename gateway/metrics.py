"""Prometheus metrics of one gateway process (served as text by the admin API)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "agentgate_requests", "Calls handled, by front end and audit outcome",
            ["mode", "outcome"], registry=self.registry)
        self.decision_seconds = Histogram(
            "agentgate_decision_seconds", "Policy decision latency",
            ["engine"], registry=self.registry,
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0))
        self.fail_open = Counter(
            "agentgate_fail_open", "Calls let through because policy failed on a fail_open route",
            ["mode"], registry=self.registry)
        self.audit_queue_depth = Gauge(
            "agentgate_audit_queue_depth", "Audit rows waiting to be written", registry=self.registry)
        self.audit_dropped = Gauge(
            "agentgate_audit_dropped", "Audit rows dropped because the queue was full",
            registry=self.registry)
        self.audit_spool_bytes = Gauge(
            "agentgate_audit_spool_bytes", "Bytes of audit records in the local spool", registry=self.registry)
        self.audit_spool_full = Gauge(
            "agentgate_audit_spool_full", "1 when the spool reached its disk quota", registry=self.registry)
        self.audit_store_reachable = Gauge(
            "agentgate_audit_store_reachable", "1 when the last shipment to ClickHouse succeeded",
            registry=self.registry)
        self.policy_reloads = Gauge(
            "agentgate_policy_reloads", "Successful policy bundle reloads", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
