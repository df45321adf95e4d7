"""mitmproxy addons: thin adapters from mitmproxy flows to the core pipeline."""
