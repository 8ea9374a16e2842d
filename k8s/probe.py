"""The torchserve container's probes, run by the kubelet inside the pod (TorchServe's inference and
management APIs listen on the pod's loopback only, which an httpGet probe cannot reach).

    probe.py http://127.0.0.1:8081/models/<model>   startup/readiness: exit 0 only when the model
                                                    has a worker in state READY
    probe.py http://127.0.0.1:8080/ping             liveness: exit 0 while the frontend answers

TorchServe's /ping answers Healthy while a worker crash-loops (it turns 500 only once a worker has
failed to come back for the model's maxRetryTimeoutInSec), so readiness asks the management API
instead: TorchServe reports a worker READY only once it runs with the model loaded. Standard
library only: the probe runs in the serving image.
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

# Straight to loopback, whatever HTTP(S)_PROXY the pod's environment carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main(url: str) -> int:
    ping = urllib.parse.urlsplit(url).path.rstrip("/") == "/ping"
    try:
        with _OPENER.open(url, timeout=3) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:  # /ping: 500 once a worker could not be brought back
        print(f"not {'alive' if ping else 'ready'}: {url}: HTTP {e.code} {e.read()[:200]!r}")
        return 1
    except (OSError, ValueError) as e:
        print(f"not {'alive' if ping else 'ready'}: {url}: {e}")
        return 1
    if ping:
        return 0  # 200: the frontend answers, Healthy or Partial Healthy
    statuses = [w.get("status") for v in answer for w in v.get("workers", [])]
    if "READY" in statuses:
        return 0
    print(f"not ready: no READY worker for {url} (workers: {statuses})")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
