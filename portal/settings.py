"""Tokenmill settings. Everything that differs between the demo and production comes from the environment.

Demo defaults (no variables set): SQLite and a filesystem Celery broker under var/, a generated secret key kept in
var/. Production (TOKENMILL_PRODUCTION=1): SECRET_KEY, ALLOWED_HOSTS and DATABASE_URL are required and the
security settings that `manage.py check --deploy` asks for are on.
"""

import os
import secrets
from pathlib import Path

import dj_database_url
import plotly
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from portal.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("TOKENMILL_VAR_DIR") or BASE_DIR / "var")
VAR_DIR.mkdir(parents=True, exist_ok=True)
(VAR_DIR / "staticfiles").mkdir(exist_ok=True)

PRODUCTION = env_bool("TOKENMILL_PRODUCTION", False)
DEBUG = env_bool("DEBUG", not PRODUCTION)
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("DEBUG must be off when TOKENMILL_PRODUCTION=1")


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        if PRODUCTION and len(key) < 50:
            raise ImproperlyConfigured("SECRET_KEY must be at least 50 characters in production")
        return key
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY is required when TOKENMILL_PRODUCTION=1")
    # Demo: generated once and kept, so sessions and hashed credentials survive a restart.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["localhost", "127.0.0.1", "[::1]", "testserver"])
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is required when TOKENMILL_PRODUCTION=1")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "ninja",  # its own Swagger UI files, so /api/v1/docs needs no CDN
    "portal.accounts",
    "portal.tenants",
    "portal.fleet",
    "portal.telemetry",
    "portal.alerts",
    "portal.economics",
    "portal.capacity",
    "portal.audit",
    "portal.standards",
    "portal.provisioning",
    "portal.health",
    "portal.bringup",
    "portal.sla",
    "portal.billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "portal.params.BadParameterMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.accounts.context_processors.roles",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'tokenmill.sqlite3'}"
if PRODUCTION and DATABASE_URL.startswith("sqlite"):
    raise ImproperlyConfigured("Production needs DATABASE_URL pointing at PostgreSQL")
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process, the Celery worker and the rollups read while one of them writes.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not :memory:, so a real Celery worker process started by the tests sees the test database; one per
    # test process, so two test runs on one machine never share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "accounts:login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
# plotly.js is served from the plotly package itself: no CDN (many factories have no internet).
STATICFILES_DIRS = [BASE_DIR / "static", ("plotly", Path(plotly.__file__).parent / "package_data")]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# E-mail: a file outbox in the demo (read it under var/mail), SMTP when EMAIL_HOST is set.
EMAIL_HOST = env_str("EMAIL_HOST", "")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
else:
    EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
    EMAIL_FILE_PATH = VAR_DIR / "mail"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Tokenmill <noreply@tokenmill.localhost>")

# Celery: kombu's filesystem transport in the demo (no server to install), Redis or RabbitMQ by URL.
_broker_dir = VAR_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL == "filesystem://":
    for sub in ("in", "processed", "control"):
        (_broker_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "in"),
        "data_folder_out": str(_broker_dir / "in"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Work that can take seconds to minutes (re-attribution, invoicing, SLA evaluation, the books, provisioning over
# SSH) runs on its own queue, so rollups, offline detection and alerts never wait behind it. Run one worker per
# queue (`-Q celery` with beat, `-Q long`), as `make demo` does.
CELERY_TASK_ROUTES = {
    "portal.economics.tasks.*": {"queue": "long"},
    "portal.billing.tasks.*": {"queue": "long"},
    "portal.sla.tasks.*": {"queue": "long"},
    # A deployment may give provisioning (SSH sessions, soaks) workers of its own.
    "portal.provisioning.tasks.*": {"queue": env_str("PROVISIONING_QUEUE", "long")},
}
CELERY_BEAT_SCHEDULE = {
    "telemetry-rollup-minutes": {"task": "portal.telemetry.tasks.rollup_minutes", "schedule": 60.0},
    "telemetry-rollup-hours": {"task": "portal.telemetry.tasks.rollup_hours", "schedule": crontab(minute="*/10")},
    "telemetry-retention": {"task": "portal.telemetry.tasks.apply_retention", "schedule": crontab(minute=17)},
    # The raw tiers' day partitions, a week ahead (PostgreSQL); hourly, so a run that met a lock is soon retried.
    "telemetry-partitions": {"task": "portal.telemetry.tasks.raw_partitions_ensure", "schedule": crontab(minute=7)},
    "fleet-offline-detection": {"task": "portal.fleet.tasks.detect_offline_nodes", "schedule": 15.0},
    "capacity-quotas": {"task": "portal.capacity.tasks.check_quotas", "schedule": 60.0},
    "capacity-billable": {"task": "portal.capacity.tasks.check_billable_deployments", "schedule": 60.0},
    "alerts-requeue-deliveries": {"task": "portal.alerts.tasks.requeue_stale_deliveries", "schedule": 300.0},
    # After the hour rollup (*/10) has folded in the hour that just ended.
    "health-incidents-close": {"task": "portal.health.tasks.close_quiet_incidents", "schedule": 60.0},
    "sla-evaluate": {"task": "portal.sla.tasks.evaluate_slas", "schedule": crontab(minute=20)},
    # After the hour rollup and attribution (*/10) and the drafts: the books of the month, checked hourly.
    "economics-reconcile": {"task": "portal.economics.tasks.reconcile_books", "schedule": crontab(minute=35)},
    # Re-attribution is queued on each change; this catches a run whose message was lost (a purged broker).
    "economics-reattribute-pending": {"task": "portal.economics.tasks.reattribute_pending", "schedule": 300.0},
    "billing-refresh-drafts": {"task": "portal.billing.tasks.refresh_drafts", "schedule": crontab(minute=25)},
    # Daily, so a missed run catches up; tenants already invoiced for last month are skipped.
    "billing-invoice-closed-month": {"task": "portal.billing.tasks.invoice_closed_month",
                                     "schedule": crontab(hour=3, minute=30)},
}

# Cache: it holds the rate-limit and login-throttle counters, so every process must share it. Redis by CACHE_URL
# or the broker's Redis; otherwise (the demo) files under var/cache, shared by the processes of one machine.
CACHE_URL = env_str("CACHE_URL") or (CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
                                     else "")
if CACHE_URL.startswith(("redis://", "rediss://")):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}}
elif CACHE_URL:
    raise ImproperlyConfigured("CACHE_URL must be a redis:// or rediss:// URL")
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(VAR_DIR / "cache"), "OPTIONS": {"MAX_ENTRIES": 100_000}}}

# Ingest limits: the contract in docs/architecture.md.
INGEST_MAX_BODY_BYTES = env_int("INGEST_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024)
INGEST_MAX_BATCHES_PER_MINUTE = env_int("INGEST_MAX_BATCHES_PER_MINUTE", 120, minimum=1)
TELEMETRY_RAW_RETENTION_HOURS = env_int("TELEMETRY_RAW_RETENTION_HOURS", 48, minimum=1)
TELEMETRY_MINUTE_RETENTION_DAYS = env_int("TELEMETRY_MINUTE_RETENTION_DAYS", 30, minimum=1)
METRICS_BEARER_TOKEN = env_str("METRICS_BEARER_TOKEN", "")
# Log-in throttling (portal/accounts/throttle.py): failed attempts per account and per address before log-ins pause
# for LOGIN_LOCKOUT_SECONDS (counted over the same period, in the cache above).
LOGIN_FAILURES_PER_ACCOUNT = env_int("LOGIN_FAILURES_PER_ACCOUNT", 5, minimum=1)
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 30, minimum=1)
LOGIN_LOCKOUT_SECONDS = env_int("LOGIN_LOCKOUT_SECONDS", 900, minimum=1)
# Public sign-up: attempts per client address and hour (the cache above holds the counters).
SIGNUP_RATE_LIMIT_PER_HOUR = env_int("SIGNUP_RATE_LIMIT_PER_HOUR", 10, minimum=1)
# Fernet key(s) encrypting uploaded SSH private keys (portal/provisioning/crypto.py; first encrypts, all decrypt).
PROVISIONING_KEY = env_str("PROVISIONING_KEY", "")
# The acceptance test before sale: soak length for sites without a bring-up plan (a plan sets its own), and the
# DCGM diagnostic level where dcgmi is installed (1: seconds, 2: about two minutes, 3-4: up to hours).
# Where links in mails sent outside a request (tenant notices of health incidents) point.
PORTAL_BASE_URL = env_str("PORTAL_BASE_URL", "http://127.0.0.1:8000")
ACCEPTANCE_SOAK_S = env_int("ACCEPTANCE_SOAK_S", 1800, minimum=0)
ACCEPTANCE_DCGM_LEVEL = env_int("ACCEPTANCE_DCGM_LEVEL", 1, minimum=1)
if PRODUCTION and not PROVISIONING_KEY:
    raise ImproperlyConfigured("PROVISIONING_KEY is required when TOKENMILL_PRODUCTION=1")

DATA_UPLOAD_MAX_MEMORY_SIZE = INGEST_MAX_BODY_BYTES

SESSION_COOKIE_HTTPONLY = True
if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
