"""Refresh docs/screenshots/: every page of a freshly seeded demo factory at 1440x900 in Debian's Chromium.

    .venv/bin/python scripts/screenshots.py [--days 30]

Seeds a demo into a temporary directory (the repository's var/ is untouched), serves it with gunicorn on a free
loopback port with DEBUG off, logs in as each role and saves one PNG per page, named after it.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = ROOT / "docs" / "screenshots"
PASSWORD = "tokenmill-demo"  # noqa: S105 - the demo's published login
OPERATOR_PAGES = [
    ("fleet", "/fleet/"), ("node", "/fleet/nodes/{node}/"), ("capacity", "/capacity/"),
    ("deployments", "/capacity/deployments/"), ("economics", "/economics/?period=30d"), ("pnl", "/economics/pnl/"),
    ("what-if", "/economics/what-if/"), ("books", "/economics/books/"), ("alerts", "/alerts/"), ("sla", "/sla/"),
    ("sla-acme", "/sla/tenants/acme/"), ("billing", "/billing/"), ("invoice", "/billing/invoices/{invoice}/"),
    ("tenants", "/tenants/"), ("version-drift", "/standards/drift/"), ("provisioning", "/provisioning/"),
    ("audit", "/audit/"), ("site-bringup", "/sites/fra-1/"), ("health", "/health/"),
    ("token-types", "/economics/token-types/"), ("advisor", "/economics/advisor/"),
    ("certified-stack", "/standards/"),
]
TENANT_PAGES = [("tenant-overview", "/tenant/acme/"), ("tenant-usage", "/tenant/acme/usage/"),
                ("tenant-sla", "/tenant/acme/sla/"), ("tenant-isolation", "/tenant/acme/isolation/"),
                ("tenant-invoices", "/tenant/acme/billing/")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    var = Path(tempfile.mkdtemp(prefix="tokenmill-shots-"))
    env = {**os.environ, "TOKENMILL_VAR_DIR": str(var), "DATABASE_URL": f"sqlite:///{var}/demo.sqlite3",
           "DEBUG": "0", "DJANGO_SETTINGS_MODULE": "portal.settings"}
    env.pop("CELERY_BROKER_URL", None)

    def manage(*command: str) -> str:
        return subprocess.run([str(BIN / "python"), "manage.py", *command], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout

    port = free_port()
    server = None
    try:
        manage("migrate", "--noinput", "-v", "0")
        manage("collectstatic", "--noinput", "-v", "0")
        manage("seed_demo", "--days", str(args.days), "--portal-url", f"http://127.0.0.1:{port}")
        ids = manage("shell", "-c", "from portal.fleet.models import Node; from portal.billing.models import Invoice; "
                     "print(Node.objects.get(hostname='iad1-h100-09').pk, "
                     "Invoice.objects.filter(tenant__slug='acme').order_by('period_start').first().pk)").split()
        node, invoice = ids[-2], ids[-1]
        server = subprocess.Popen([str(BIN / "gunicorn"), "portal.wsgi", "--bind", f"127.0.0.1:{port}",
                                   "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)  # noqa: S310 - loopback
                break
            except OSError:
                time.sleep(0.2)
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            for username, pages in (("operator", OPERATOR_PAGES), ("acme-admin", TENANT_PAGES)):
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(f"{base}/accounts/login/")
                page.get_by_label("E-mail or username").fill(username)
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Log in").click()
                page.wait_for_load_state("networkidle")
                for name, path in pages:
                    page.goto(base + path.format(node=node, invoice=invoice))
                    page.wait_for_load_state("networkidle")
                    page.wait_for_timeout(500)  # plotly draws after load
                    page.screenshot(path=OUT / f"{name}.png")
                    print(f"docs/screenshots/{name}.png")
                page.close()
            browser.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(var, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
