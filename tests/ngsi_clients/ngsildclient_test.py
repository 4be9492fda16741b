"""yunqi's NGSI-LD API driven by published client libraries, as FIWARE agents and applications
use them: PyPI's ngsildclient (the client's connectivity probe, create, batch upsert, query with
q, count, retrieve, delete; a department without the right is refused) and npm's ngsijs
(ngsijs_test.js, against the same server).

Usage: python tests/ngsi_clients/ngsildclient_test.py BINARY   (with ngsildclient installed:
scripts/ngsi_clients.sh)
"""

import json
import os
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


def main():
    data = tempfile.mkdtemp(prefix="yunqi-ngsi-")
    server = subprocess.Popen([BINARY, "serve", "--data", data, "--http", "127.0.0.1:0",
                               "--pg", "127.0.0.1:0"], stdout=subprocess.PIPE,
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

        # npm's ngsijs against the same server.
        modules = os.environ.get("NGSIJS_MODULES")
        assert modules, "NGSIJS_MODULES names the node_modules with ngsijs (scripts/ngsi_clients.sh)"
        subprocess.run(["node", os.path.join(os.path.dirname(__file__), "ngsijs_test.js")],
                       check=True, env=dict(os.environ, NODE_PATH=modules, YUNQI_URL=url,
                                            YUNQI_TOKEN=tok["iot_agent"]))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
