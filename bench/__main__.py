"""``python -m bench``: see ``python -m bench --help``."""

from __future__ import annotations

import asyncio
import sys

from bench import options, report, runner


def main(argv: list[str] | None = None) -> int:
    opts = options.parse(argv)
    result = asyncio.run(runner.run(opts))
    result["targets"] = [] if opts.leak_only else report.evaluate_targets(result)
    result["problems"] = report.problems(result, opts.only, opts.leak, opts.leak_only)
    js, md = report.write(result, opts.out)
    text = report.markdown(result)
    print(text)
    print(f"bench: wrote {js} and {md}")
    if result["problems"]:
        print(f"bench: {len(result['problems'])} problem(s): some configurations produced no numbers",
              file=sys.stderr)
        return 1
    return 0  # targets are reported, never a failure


if __name__ == "__main__":
    sys.exit(main())
