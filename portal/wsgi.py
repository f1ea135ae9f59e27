import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_wsgi_application()
# Everything loaded so far lives as long as the worker: keep it out of the collector's generations, so the full
# collections a large page's ten thousand short-lived objects trigger do not walk the whole of Django each time.
gc.freeze()
