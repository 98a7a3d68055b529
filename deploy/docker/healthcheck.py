"""Container health check: exit 0 when GET /health on the local server reports status "ok".

The server listens on MATLORA_PORT; the check connects to 127.0.0.1, so MATLORA_HOST must be 0.0.0.0 or a loopback
address. /health needs no API key.
"""

import json
import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('MATLORA_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        status = json.load(response).get("status")
except (OSError, ValueError) as error:
    print(f"health check failed: GET {url}: {error}", file=sys.stderr)
    sys.exit(1)
if status != "ok":
    print(f"health check failed: GET {url} returned status {status!r}", file=sys.stderr)
    sys.exit(1)
