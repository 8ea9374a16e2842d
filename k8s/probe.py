"""The torchserve container's probes, run by the kubelet inside the pod (TorchServe's inference and
management APIs listen on the pod's loopback only, which an httpGet probe cannot reach).

    probe.py http://127.0.0.1:8081/models/<model>   startup/readiness: exit 0 only when the model
                                                    has a worker in state READY
    probe.py http://127.0.0.1:8080/ping             liveness: exit 0 while the frontend answers
    probe.py http://127.0.0.1:8080/predictions/<model>
                                                    the image's HEALTHCHECK: exit 0 only when an
                                                    8x8 PNG gets a caption, with the inference key
                                                    from ./key_file.json when token auth is on

TorchServe's /ping answers Healthy while a worker crash-loops (it turns 500 only once a worker has
failed to come back for the model's maxRetryTimeoutInSec), so readiness asks the management API
instead: TorchServe reports a worker READY only once it runs with the model loaded. Standard
library only: the probe runs in the serving image. The caption check is the one that fails when
inference fails for any reason: a dead worker, an expired or replaced key, a broken archive.
"""

import base64
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

# Straight to loopback, whatever HTTP(S)_PROXY the pod's environment carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# An 8x8 red PNG: the smallest request that goes all the way through a worker.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfH"
    "gA0wMeAAg1MCANDKARQfGKMRAAAAAElFTkSuQmCC"
)
KEY_FILE = "key_file.json"  # TorchServe writes it to its working directory when token auth is on


def main(url: str) -> int:
    if urllib.parse.urlsplit(url).path.startswith("/predictions/"):
        return caption(url)
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


def caption(url: str) -> int:
    """0 when TorchServe captions a tiny image, with the inference key if there is a key file."""
    headers = {"Content-Type": "application/octet-stream"}
    try:
        with open(KEY_FILE) as keys:
            headers["Authorization"] = f"Bearer {json.load(keys)['inference']['key']}"
    except FileNotFoundError:
        pass  # token auth off
    except (OSError, ValueError, KeyError) as e:
        print(f"not healthy: cannot read the inference key from {KEY_FILE}: {e!r}")
        return 1
    request = urllib.request.Request(url, data=PNG, headers=headers, method="PUT")
    try:
        with _OPENER.open(request, timeout=4) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:  # 400 InvalidKeyException: an expired or replaced key
        print(f"not healthy: {url}: HTTP {e.code} {e.read()[:200]!r}")
        return 1
    except (OSError, ValueError) as e:
        print(f"not healthy: {url}: {e}")
        return 1
    if "caption" not in answer:
        print(f"not healthy: {url} answered without a caption: {str(answer)[:200]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
