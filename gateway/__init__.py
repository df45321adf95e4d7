"""agentgate's core: configuration, identity, policy, approvals, kill-switches, the pipeline.

regopy is imported here, before anything else of ours can load aiohttp: when frozenlist's C++
extension (an aiohttp dependency) is loaded first, every rego-cpp query leaks native memory
(~4.5 KB per decision, found with the bench's leak run; tests/test_policy_memory.py). Loading
regopy first avoids it.
"""

import regopy  # noqa: F401  - must precede aiohttp (see above)
