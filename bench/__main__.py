"""``python -m bench``: see ``python -m bench --help``."""

from __future__ import annotations

import asyncio
import json
import sys

from bench import options, runner

if __name__ == "__main__":
    opts = options.parse()
    report = asyncio.run(runner.run(opts))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["results"], indent=1)[:3000])
    sys.exit(0)
