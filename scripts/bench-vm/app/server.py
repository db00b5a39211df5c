"""The bench application: a small numpy service, installed in the resumed bench base from
Debian packages (python3, python3-numpy). GET / answers JSON with the guest's boot token (RAM),
a count of requests served, and a figure computed by numpy over a matrix built at start-up and
kept in memory, so the first answer after a resume proves the process and its heap came back."""
import http.server
import json
import numpy as np

rng = np.random.default_rng(20261201)
MATRIX = rng.standard_normal((1024, 1024))  # 8 MiB of heap that must survive a resume
CHECK = float(np.linalg.norm(MATRIX @ MATRIX[:, :8]))
served = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        served += 1
        with open('/tmp/token') as f:
            token = f.read().strip()
        body = json.dumps({'token': token, 'app': 'bench-numpy', 'served': served,
                           'check': round(CHECK, 6), 'numpy': np.__version__}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


with open('/tmp/app-state', 'w') as f:
    f.write('bench-numpy started\n')
http.server.ThreadingHTTPServer(('0.0.0.0', 8000), Handler).serve_forever()
