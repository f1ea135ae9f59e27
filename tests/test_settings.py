import os
import subprocess
import sys

from django.conf import settings

PROD_ENV = {
    "TOKENMILL_PRODUCTION": "1",
    "SECRET_KEY": "x" * 20 + "-production-secret-key-for-the-deploy-check-0123456789",
    "ALLOWED_HOSTS": "tokenmill.example.com",
    "DATABASE_URL": "postgres://tokenmill@127.0.0.1:5432/tokenmill",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    "PROVISIONING_KEY": "q6N0eA1mX2l8e6bHk0m6bS0f1b3oVv2z8Qe8mJ9cP1Y=",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    inherited = {"DATABASE_URL", "CELERY_BROKER_URL", "DEBUG", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    clean = {k: v for k, v in os.environ.items() if k not in inherited}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env={**clean, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_it_passes_the_deploy_check_in_production_mode():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PROD_ENV)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_it_refuses_to_start_in_production_without_a_secret_key():
    env = {k: v for k, v in PROD_ENV.items() if k != "SECRET_KEY"}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr


def test_it_names_the_variable_with_a_bad_value():
    result = manage("check", env={"DEBUG": "maybe"})
    assert result.returncode != 0
    assert "DEBUG='maybe' is not a boolean" in result.stderr
    result = manage("check", env={"INGEST_MAX_BODY_BYTES": "lots"})
    assert "INGEST_MAX_BODY_BYTES='lots' is not an integer" in result.stderr


def test_it_refuses_sqlite_in_production():
    result = manage("check", env={**PROD_ENV, "DATABASE_URL": "sqlite:////tmp/x.sqlite3"})
    assert result.returncode != 0
    assert "Production needs DATABASE_URL pointing at PostgreSQL" in result.stderr
