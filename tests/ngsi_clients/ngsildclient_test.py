"""yunqi's NGSI-LD API driven by published client libraries, as FIWARE agents and applications
use them: PyPI's ngsildclient (the client's connectivity probe, create, batch upsert, query with
q, count, retrieve, delete, subscriptions with their notifications received over HTTP; a
department without the right is refused) and npm's ngsijs (ngsijs_test.js, against the same
server).

Usage: python tests/ngsi_clients/ngsildclient_test.py BINARY   (with ngsildclient installed:
scripts/ngsi_clients.sh)
"""

import http.server
import json
import os
import threading
import subprocess
import sys
import tempfile
import time
import urllib.request

import requests
from ngsildclient import Client, Entity

BINARY = sys.argv[1]


class Bearer(requests.auth.AuthBase):
    def __init__(self, token):
        self.token = token

    def __call__(self, r):
        r.headers["Authorization"] = "Bearer " + self.token
        return r


def call(url, token, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
        return json.loads(text) if text else None


RECEIVED = []


class Hook(http.server.BaseHTTPRequestHandler):
    """The endpoint notifications are sent to: records each, answers 204."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        RECEIVED.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def received(path, until, what):
    deadline = time.time() + 20
    while time.time() < deadline:
        data = [e for p, n in list(RECEIVED) if p == path for e in n["data"]]
        if until(data):
            return data
        time.sleep(0.05)
    raise AssertionError(f"{what}: {path} received {RECEIVED}")


def main():
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook.server_address[1]}"
    data = tempfile.mkdtemp(prefix="yunqi-ngsi-")
    server = subprocess.Popen([BINARY, "serve", "--data", data, "--http", "127.0.0.1:0",
                               "--pg", "127.0.0.1:0", "--notify-allow", hook_url + "/"],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env=dict(os.environ, RUST_LOG="warn"))
    try:
        url = None
        deadline = time.time() + 60
        for line in server.stdout:
            if line.strip().startswith("API"):
                url = line.split()[1].replace("/api/v1/", "")
            if line.startswith("ready") or time.time() > deadline:
                break
        assert url, "yunqi did not start"
        host, port = url.replace("http://", "").split(":")
        admin = open(os.path.join(data, "admin.token")).read().strip()
        for d in ["traffic", "police"]:
            call(url, admin, "POST", "/api/v1/departments", {"name": d})
        tok = {}
        for name, role, dept in [("tsteward", "steward", "traffic"),
                                 ("iot_agent", "service", "traffic"),
                                 ("pofficer", "analyst", "police")]:
            v = call(url, admin, "POST", "/api/v1/principals",
                     {"name": name, "role": role, "department": dept})
            tok[name] = v["token"]["token"]
        call(url, tok["tsteward"], "POST", "/api/v1/sql", {"sql":
             "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, "
             "district TEXT) WITH (event_time = 'date_observed', ngsi_type = 'TrafficFlowObserved')"})

        # The client probes the broker when it is made: that must succeed.
        client = Client(hostname=host, port=int(port), custom_auth=Bearer(tok["iot_agent"]),
                        verbose=False)
        assert client.is_connected(), "the client's probe failed"

        def flow(i, intensity):
            e = Entity("TrafficFlowObserved", f"seg-{i:03}")
            e.prop("intensity", intensity)
            e.prop("district", "西湖区" if i % 2 else "上城区")
            return e

        assert client.create(flow(0, 10))
        result = client.upsert(*[flow(i, 100 + i) for i in range(1, 20)])
        assert result, result
        got = client.get("urn:ngsi-ld:TrafficFlowObserved:seg-005")
        assert got["intensity"].value == 105, got.to_json()
        heavy = client.query(type="TrafficFlowObserved", q="intensity>110")
        assert sorted(e.id for e in heavy) == [f"urn:ngsi-ld:TrafficFlowObserved:seg-{i:03}" for i in range(11, 20)], [e.id for e in heavy]
        assert client.count(type="TrafficFlowObserved") == 20
        assert client.query(type="NoSuchType") == []
        assert client.delete(got)
        assert not client.exists("urn:ngsi-ld:TrafficFlowObserved:seg-005")
        assert client.count(type="TrafficFlowObserved") == 19

        # Another department may not write the type.
        other = Client(hostname=host, port=int(port), custom_auth=Bearer(tok["pofficer"]),
                       verbose=False)
        # (through the client's own session: its error mapping knows only ETSI's error types,
        # and a refusal is yunqi's permission_denied)
        r = other.session.post(url + "/ngsi-ld/v1/entities/", data=flow(50, 1).to_json())
        assert r.status_code == 403, (r.status_code, r.text)
        assert client.count(type="TrafficFlowObserved") == 19
        print("ngsildclient: probe, create, upsert, get, query, count, delete and refusal passed")

        # Subscriptions through the client's API; notifications arrive at the endpoint.
        sid = client.subscriptions.create({
            "type": "Subscription",
            "name": "heavy traffic",
            "entities": [{"type": "TrafficFlowObserved"}],
            "watchedAttributes": ["intensity"],
            "q": "intensity>500",
            "notification": {"format": "keyValues", "endpoint": {"uri": hook_url + "/py",
                                                                   "accept": "application/json"}},
            "@context": "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld",
        })
        assert sid and sid.startswith("urn:ngsi-ld:Subscription:"), sid
        assert [s["id"] for s in client.subscriptions.list()] == [sid]
        assert client.subscriptions.get(sid)["status"] == "active"
        client.upsert(flow(1, 501), flow(2, 7))
        got = received("/py", lambda d: len(d) >= 1, "python subscription")
        assert [(e["id"], e["intensity"]) for e in got] == [
            ("urn:ngsi-ld:TrafficFlowObserved:seg-001", 501)], got
        deadline = time.time() + 20
        while client.subscriptions.get(sid)["notification"]["timesSent"] < 1:
            assert time.time() < deadline, client.subscriptions.get(sid)
            time.sleep(0.05)
        assert client.subscriptions.delete("heavy")
        client.upsert(flow(1, 101))
        assert client.subscriptions.list() == []
        print("ngsildclient: subscription create, list, get, notification and delete passed")

        # npm's ngsijs against the same server.
        modules = os.environ.get("NGSIJS_MODULES")
        assert modules, "NGSIJS_MODULES names the node_modules with ngsijs (scripts/ngsi_clients.sh)"
        subprocess.run(["node", os.path.join(os.path.dirname(__file__), "ngsijs_test.js")],
                       check=True, env=dict(os.environ, NODE_PATH=modules, YUNQI_URL=url,
                                            YUNQI_TOKEN=tok["iot_agent"],
                                            NOTIFY_URL=hook_url + "/js"))
        got = received("/js", lambda d: len(d) >= 1, "ngsijs subscription")
        assert got[0]["id"] == "urn:ngsi-ld:TrafficFlowObserved:js-002", got
        print("ngsijs: its subscription's notification arrived")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
