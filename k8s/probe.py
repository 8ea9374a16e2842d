"""Readiness/startup probe: exit 0 only when the model has a worker in state READY.

TorchServe's /ping answers Healthy while a worker crash-loops, so the kubelet asks the management
API instead (on the pod's loopback; the NetworkPolicy does not apply to it). TorchServe reports a
worker READY only once it runs with the model loaded. Standard library only: the probe runs in the
serving image. Usage: probe.py <management URL>/models/<model name>
"""

import json
import sys
import urllib.request

# Straight to loopback, whatever HTTP(S)_PROXY the pod's environment carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main(url: str) -> int:
    try:
        with _OPENER.open(url, timeout=3) as response:
            versions = json.load(response)
    except (OSError, ValueError) as e:
        print(f"not ready: {url}: {e}")
        return 1
    statuses = [w.get("status") for v in versions for w in v.get("workers", [])]
    if "READY" in statuses:
        return 0
    print(f"not ready: no READY worker for {url} (workers: {statuses})")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
