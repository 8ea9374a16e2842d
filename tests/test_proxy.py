"""The proxy in front of TorchServe (serve/nginx.conf.template, run by serve/proxy.py): the real
nginx on free loopback ports, in front of a stand-in TorchServe that records what reaches it and
answers as TorchServe would (tests/test_page.py and tests/test_pod.py put the real one behind it).

What it must do: serve the page, pass the inference API through unchanged (`curl -T` works as it
does against TorchServe), refuse bodies over TorchServe's cap itself, keep the rest of TorchServe
(its OPTIONS / API description, management, metrics, explanations) out of reach, and answer its
own refusals in the API's JSON shape. And the pod runs exactly this template (k8s/nginx.conf).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from serve import demo, proxy
from serve.proxy import Nginx
from serve.runner import free_ports, read_config
from tests.helpers.marks import needs

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "serve" / "web"
MAX_BODY = 64 * 1024  # small, so that the test sends little; the real cap comes from the config
API_DESCRIPTION = {"openapi": "3.0.1", "info": {"title": "TorchServe APIs"}}

needs_nginx = pytest.mark.skipif(proxy.binary() is None, reason=f"no nginx ({proxy.INSTALL_HINT})")


class StandIn(ThreadingHTTPServer):
    """A TorchServe stand-in: records (method, path, body) and answers like TorchServe 0.12."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[tuple[str, str, bytes]] = []
        self.answers: dict[str, tuple[int, dict]] = {}  # body marker -> (status, JSON)
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive expects

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.seen.append((self.command, self.path, body))
        status, answer = 200, {"caption": "a red circle", "bytes": len(body)}
        if self.command == "OPTIONS":
            answer = API_DESCRIPTION
        elif self.path == "/ping":
            answer = {"status": "Healthy"}
        for marker, reply in self.server.answers.items():
            if marker.encode() in body:
                status, answer = reply
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_OPTIONS = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def torchserve():
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
@needs("nginx")
def page(torchserve, tmp_path_factory):
    if proxy.binary() is None:
        pytest.skip(f"nginx is not installed ({proxy.INSTALL_HINT})")
    workdir = tmp_path_factory.mktemp("nginx")
    with Nginx.configure(workdir, inference=torchserve.address, max_body=MAX_BODY) as nginx:
        yield nginx


@pytest.fixture
def seen(torchserve) -> list:
    torchserve.seen.clear()
    torchserve.answers.clear()
    return torchserve.seen


# --- the pod runs this template ---------------------------------------------------------------


def test_k8s_nginx_conf_is_the_template_rendered_for_the_pod():
    assert (ROOT / "k8s" / "nginx.conf").read_text() == proxy.cluster_config(), (
        "k8s/nginx.conf is stale: python -m serve.proxy cluster > k8s/nginx.conf"
    )
    config = (ROOT / "k8s" / "nginx.conf").read_text()
    torchserve = read_config(ROOT / "k8s" / "torchserve.properties")
    assert (
        re.search(r"^\s*server 127\.0\.0\.1:(\d+);", config, re.MULTILINE)[1]
        == (torchserve["inference_address"].rsplit(":", 1)[1])
    )
    assert f"client_max_body_size {torchserve['max_request_size']};" in config
    deployment = yaml.safe_load((ROOT / "k8s" / "deployment.yaml").read_text())
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "proxy"]  # fmt: skip
    assert [p["containerPort"] for p in container["ports"]] == [int(proxy.CLUSTER["listen"])]
    assert "-c /etc/imgtocap/nginx.conf" in " ".join(container["command"])


def test_the_template_names_no_placeholder_it_is_not_given(tmp_path):
    assert not re.search(r"\$\{\w+\}", proxy.cluster_config())
    (tmp_path / "t").write_text("listen ${LISTEN}; root ${ROOTS};")
    with pytest.raises(KeyError, match="ROOTS"):
        proxy.render(
            template=tmp_path / "t",
            **{k: "x" for k in ("listen", "inference", "root", "run_dir", "error_log")},
            access_log="x",
            max_body=1,
        )


# --- the page ---------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served(page, seen):
    response = requests.get(f"{page.url}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<script src="app.js"' in response.text
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = requests.get(f"{page.url}/{name}", timeout=10)
        assert response.status_code == 200 and response.text == (WEB / name).read_text()
        assert response.headers["Content-Type"].startswith(kind), name
    assert requests.get(f"{page.url}/favicon.svg", timeout=10).headers["Content-Type"] == (
        "image/svg+xml"
    )
    assert seen == [], "the page's files must come from nginx, not TorchServe"


def test_the_page_loads_nothing_from_another_host():
    for path in (p for p in WEB.rglob("*") if p.suffix in {".html", ".js", ".css", ".svg"}):
        text = re.sub(r'xmlns="[^"]*"', "", path.read_text())  # a name, not a download
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}/", text), f"{path.name}: a URL"
        assert "@import" not in text and "import(" not in text, path.name


# --- the inference API ------------------------------------------------------------------------


def test_curl_t_reaches_torchserve_unchanged(page, seen):
    image = bytes(range(256)) * 40
    response = requests.put(f"{page.url}/predictions/imgtocap", data=image, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"caption": "a red circle", "bytes": len(image)}
    assert seen == [("PUT", "/predictions/imgtocap", image)]

    seen.clear()
    form = requests.post(
        f"{page.url}/predictions/imgtocap", files={"data": image}, data={"attention": "true"}
    )
    assert form.status_code == 200
    (method, path, body), = seen  # fmt: skip
    assert (method, path) == ("POST", "/predictions/imgtocap") and image in body
    seen.clear()
    query = "/invocations?model_name=imgtocap&num_beams=1"
    assert requests.post(f"{page.url}{query}", data=image, timeout=10).status_code == 200
    assert seen == [("POST", query, image)]


def test_torchserve_s_errors_pass_through_unchanged(page, torchserve, seen):
    torchserve.answers["bad"] = (400, {"error": "request body is not a readable image"})
    torchserve.answers["died"] = (507, {"code": 507, "type": "InternalServerException",
                                        "message": "Worker died."})  # fmt: skip
    bad = requests.put(f"{page.url}/predictions/imgtocap", data=b"bad", timeout=10)
    assert (bad.status_code, bad.json()) == (400, {"error": "request body is not a readable image"})
    died = requests.put(f"{page.url}/predictions/imgtocap", data=b"died", timeout=10)
    assert died.status_code == 507 and died.json()["message"] == "Worker died."


def test_a_body_over_the_cap_is_refused_before_torchserve(page, seen):
    response = requests.put(
        f"{page.url}/predictions/imgtocap", data=bytes(MAX_BODY + 1), timeout=10
    )
    assert response.status_code == 413
    assert "larger than 65,536 bytes" in response.json()["error"]
    assert seen == []
    ok = requests.put(f"{page.url}/predictions/imgtocap", data=bytes(MAX_BODY), timeout=10)
    assert ok.status_code == 200 and ok.json()["bytes"] == MAX_BODY


def test_the_rest_of_torchserve_is_out_of_reach(page, seen):
    described = requests.options(f"{page.url}/", timeout=10)
    assert described.status_code == 405 and "openapi" not in described.text
    assert "POST or PUT to /predictions/imgtocap" in described.json()["error"]
    for path in ("/api-description", "/models", "/models/imgtocap", "/metrics",
                 "/explanations/imgtocap", "/v1/models/imgtocap:predict", "/v2/models"):  # fmt: skip
        response = requests.post(f"{page.url}{path}", data=b"x", timeout=10)
        assert response.status_code in (404, 405), path
        assert "error" in response.json(), path
    for method in ("GET", "DELETE", "OPTIONS"):
        response = requests.request(method, f"{page.url}/predictions/imgtocap", timeout=10)
        assert response.status_code == 405, method
    assert seen == []


def test_a_path_too_long_for_a_file_is_a_404_not_a_500(page):
    """open() fails with ENAMETOOLONG on these; nginx answered its own 500 page."""
    long_name = requests.get(f"{page.url}/{'x' * 300}", timeout=10)
    too_deep = requests.get(f"{page.url}/{'x/' * 3000}", timeout=10)  # past PATH_MAX
    for response in (long_name, too_deep):
        assert response.status_code == 404
        assert "error" in response.json()
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_ping_answers_without_a_secret(page, seen):
    response = requests.get(f"{page.url}/ping", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "Healthy"})
    assert seen == [("GET", "/ping", b"")]


@needs_nginx
@pytest.mark.nginx
def test_an_unreachable_torchserve_is_a_503_to_retry(tmp_path):
    (closed,) = free_ports(1)
    with Nginx.configure(tmp_path, inference=f"127.0.0.1:{closed}") as nginx:
        response = requests.put(f"{nginx.url}/predictions/imgtocap", data=b"img", timeout=10)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "retry in a few seconds" in response.json()["error"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


@needs_nginx
@pytest.mark.nginx
def test_stop_stops_the_nginx_a_config_names(tmp_path, torchserve):
    nginx = Nginx.configure(tmp_path, inference=torchserve.address).start(detach=True)
    master = nginx.running()
    assert master is not None and master.is_running()
    assert proxy.stop(tmp_path)
    assert not master.is_running() and nginx.running() is None
    assert not proxy.stop(tmp_path)  # nothing left to stop: fine, as `make stop` twice


def test_demo_without_nginx_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(proxy, "binary", lambda: None)
    message = demo.start_page("http://127.0.0.1:8080")
    assert "nginx" in message and "apt-get install nginx" in message
    assert "The API above works without it" in message


# --- slow and greedy clients, and every answer of nginx's own in JSON -------------------------


SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options")


def assert_json_refusal(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert message in response.json()["error"]
    for header in SECURITY_HEADERS:
        assert header in response.headers, (status, header)


def test_a_full_queue_is_a_429_to_retry_not_a_missing_worker(page, torchserve, seen):
    torchserve.answers["full"] = (503, {"code": 503, "type": "ServiceUnavailableException",
        "message": "Model \"imgtocap\" has no worker to serve inference request. "
                   "Please use scale workers API to add workers."})  # fmt: skip
    response = requests.put(f"{page.url}/predictions/imgtocap", data=b"full", timeout=10)
    assert_json_refusal(response, 429, "the model is busy (its queue is full)")
    assert int(response.headers["Retry-After"]) > 0
    assert "scale workers" not in response.text
    ok = requests.put(f"{page.url}/predictions/imgtocap", data=b"img", timeout=10)
    assert ok.status_code == 200 and "Retry-After" not in ok.headers


def test_a_form_encoded_body_is_a_415_that_echoes_nothing(page, seen):
    png = b"\x89PNG\r\n\x1a\nsecret-bytes"
    response = requests.put(
        f"{page.url}/predictions/imgtocap",
        data=png,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert_json_refusal(response, 415, "form-encoded body is not an image")
    assert b"secret-bytes" not in response.content and seen == []


def test_nginx_s_own_errors_are_json_with_the_security_headers(page, seen):
    too_long = requests.get(f"{page.url}/{'x' * 9000}", timeout=10)
    assert_json_refusal(too_long, 414, "URL is too long")
    huge_header = requests.get(f"{page.url}/", headers={"X-Big": "y" * 20000}, timeout=10)
    assert_json_refusal(huge_header, 400, "malformed HTTP request, or headers too large")
    with socket.create_connection(page.url.removeprefix("http://").split(":")) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        answer = raw.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 400") and "nosniff" in answer and '{"error"' in answer
    assert seen == []


@needs_nginx
@pytest.mark.nginx
def test_an_unreachable_torchserve_answers_with_the_security_headers(tmp_path):
    (closed,) = free_ports(1)
    with Nginx.configure(tmp_path, inference=f"127.0.0.1:{closed}") as nginx:
        response = requests.put(f"{nginx.url}/predictions/imgtocap", data=b"img", timeout=10)
    assert_json_refusal(response, 503, "retry in a few seconds")
    assert response.headers["Retry-After"] == "5"


@needs_nginx
@pytest.mark.nginx
def test_a_greedy_client_gets_429_and_the_page_stays_up(tmp_path, torchserve, seen):
    with Nginx.configure(tmp_path, inference=torchserve.address) as nginx, requests.Session() as s:
        answers = [
            s.put(f"{nginx.url}/predictions/imgtocap", data=b"img", timeout=10) for _ in range(150)
        ]
        page = s.get(f"{nginx.url}/", timeout=10)
    statuses = [a.status_code for a in answers]
    # 10 a second after a burst of 40: however slow this machine, 150 in a row meet the limit
    assert statuses[:40] == [200] * 40 and 429 in statuses, statuses
    refused = answers[statuses.index(429)]
    assert_json_refusal(refused, 429, "too many requests")
    assert int(refused.headers["Retry-After"]) > 0
    assert page.status_code == 200  # the page's files are not rate-limited


ATTACKERS = 600  # past the 512 worker_connections that 510 such clients exhausted


@needs_nginx
@pytest.mark.nginx
@pytest.mark.slow
def test_slow_clients_do_not_take_the_proxy_offline(tmp_path, torchserve):
    """600 connections each trickling a header line a second (a slowloris) while a client asks
    /ping twice a second: every ping is answered, and nginx drops the slow ones on its header
    timeout. Before the limits, the pings got no answer at all."""
    with Nginx.configure(tmp_path, inference=torchserve.address) as nginx:
        address = nginx.url.removeprefix("http://").split(":")
        slow = []
        for _ in range(ATTACKERS):
            connection = socket.create_connection(address, timeout=5)
            connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            slow.append(connection)
        served, latencies, dropped = 0, [], set()
        start = time.monotonic()
        while time.monotonic() - start < 15:
            for i, connection in enumerate(slow):
                if i not in dropped:
                    try:
                        connection.sendall(b"X-Slow: 1\r\n")
                    except OSError:  # nginx closed it
                        dropped.add(i)
            asked = time.monotonic()
            with contextlib.suppress(requests.RequestException):
                served += requests.get(f"{nginx.url}/ping", timeout=3).status_code == 200
            latencies.append(time.monotonic() - asked)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - asked)))
        for connection in slow:
            connection.close()
    print(f"{served}/{len(latencies)} pings answered, slowest {max(latencies):.2f} s, "
          f"{len(dropped)}/{ATTACKERS} slow connections dropped")  # fmt: skip
    assert served == len(latencies)
    assert len(dropped) == ATTACKERS  # the header timeout (10 s) ended every one
