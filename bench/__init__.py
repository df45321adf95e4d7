"""agentgate benchmark harness: ``python -m bench`` (``make bench``).

Starts, on 127.0.0.1 only, a real aiohttp upstream, the gateway (and a bare mitmproxy for the
engine's floor), drives them with ``wrk`` when installed or the built-in aiohttp generator,
and writes ``bench/results/latest.json`` and ``latest.md``. Every load loop is bounded in
request count and in time.
"""
