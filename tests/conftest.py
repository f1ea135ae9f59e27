import os
import shutil

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection

from portal.celery import app as celery_app
from portal.telemetry.api import _agent_config

# Playwright's sync API runs an event loop in the test thread; the Django calls the tests make are still sync.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def require(condition: bool, what: str) -> None:
    """Skip locally when a real part is missing; in CI a missing part is a failure, never a skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


@pytest.fixture(autouse=True, scope="session")
def _celery_eager():
    """Unit tests run tasks inline; tests marked `worker` use a real worker process instead."""
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


@pytest.fixture(autouse=True)
def _clear_cache():
    """Rate-limit counters live in the cache, agent configs in the process; row ids repeat across rolled-back
    tests."""
    cache.clear()
    _agent_config.cache_clear()
    yield
    cache.clear()
    _agent_config.cache_clear()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    require(os.path.exists(CHROMIUM), "Chromium (/usr/bin/chromium)")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    }


@pytest.fixture
def artifacts_dir():
    path = settings.BASE_DIR / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def bad_parameters(response) -> set[str]:
    """The parameters a 400 page names (portal.params.BadParameter), after checking it is one."""
    assert response.status_code == 400, response.status_code
    problems = response.context["problems"]
    for name in problems:
        assert f"<code>{name}</code>:" in response.content.decode()
    return set(problems)
