from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.fleet.models import Node
from portal.params import query_params
from portal.provisioning import selectors, services
from portal.provisioning.forms import (
    AddNodesForm,
    CredentialForm,
    DecommissionForm,
    HostKeyConfirmForm,
    JobFilterForm,
)
from portal.provisioning.models import JobStatus, KnownHost, ProvisioningJob
from portal.provisioning.ssh import KeyFormatError


@operator_required
def index(request: HttpRequest) -> HttpResponse:
    status = query_params(request, JobFilterForm)["status"] or None
    rows = selectors.jobs_list(status=status)
    context = {"rows": rows, "polls": selectors.any_polling(rows), "status": status, "statuses": JobStatus.choices}
    template = "provisioning/index.html#jobs" if request.htmx else "provisioning/index.html"
    return render(request, template, context)


@operator_admin_required
def new(request: HttpRequest) -> HttpResponse:
    form = AddNodesForm(request.POST if request.method == "POST" else None,
                        initial={"portal_url": request.build_absolute_uri("/").rstrip("/")})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            jobs = services.jobs_create(
                site=data["site"], hosts=data["host_specs"], credential=data["credential"],
                install_dir=data["install_dir"], simulate_gpus=data["simulate_gpus"], portal_url=data["portal_url"],
                known_hosts=data["known_hosts"], by=request.user,
            )
        except services.ProvisioningError as exc:
            form.add_error("hosts", str(exc))
        else:
            if len(jobs) == 1:
                return redirect("provisioning:job", job_id=jobs[0].pk)
            messages.success(request, f"{len(jobs)} provisioning jobs created.")
            return redirect("provisioning:index")
    has_keys = selectors.credentials_list().exists()
    return render(request, "provisioning/new.html", {"form": form, "has_keys": has_keys})


def _job_or_404(job_id: int) -> ProvisioningJob:
    return get_object_or_404(ProvisioningJob, pk=job_id)


@operator_required
def job(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        view = selectors.job_detail(job_id=job_id)
    except ProvisioningJob.DoesNotExist:
        raise Http404("No such job") from None
    template = "provisioning/job.html#live" if request.htmx else "provisioning/job.html"
    return render(request, template, {"v": view, "job": view.job})


def _act(request: HttpRequest, job_id: int, action, done: str) -> HttpResponse:
    job = _job_or_404(job_id)
    try:
        action(job)
    except services.ProvisioningError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done)
    return redirect("provisioning:job", job_id=job.pk)


@operator_admin_required
@require_POST
def confirm_host_key(request: HttpRequest, job_id: int) -> HttpResponse:
    form = HostKeyConfirmForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The confirmation carries no fingerprint; reload the page.")
        return redirect("provisioning:job", job_id=job_id)
    return _act(request, job_id, lambda j: services.host_key_confirm(
        job=j, fingerprint_shown=form.cleaned_data["fingerprint"], by=request.user), "Host key confirmed and pinned.")


@operator_admin_required
@require_POST
def reject_host_key(request: HttpRequest, job_id: int) -> HttpResponse:
    return _act(request, job_id, lambda j: services.host_key_reject(job=j, by=request.user),
                "Host key rejected; the job is cancelled.")


@operator_admin_required
@require_POST
def cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    return _act(request, job_id, lambda j: services.job_cancel(job=j, by=request.user), "Job cancelled.")


@operator_admin_required
@require_POST
def retry(request: HttpRequest, job_id: int) -> HttpResponse:
    return _act(request, job_id, lambda j: services.job_retry(job=j, by=request.user),
                "Job queued again; completed steps will be skipped.")


@operator_admin_required
def keys(request: HttpRequest) -> HttpResponse:
    posted = request.method == "POST"
    form = CredentialForm(request.POST if posted else None, request.FILES if posted else None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            if data.get("key_data"):
                credential = services.credential_create_upload(
                    name=data["name"], key_data=data["key_data"], passphrase=data["passphrase"], by=request.user
                )
            else:
                credential = services.credential_create_path(name=data["name"], path=data["key_path"],
                                                              by=request.user)
        except KeyFormatError as exc:
            form.add_error("key_file", str(exc))
        else:
            messages.success(request, f"SSH key {credential.name} ({credential.fingerprint}) stored.")
            return redirect("provisioning:keys")
    return render(request, "provisioning/keys.html", {
        "form": form, "credentials": selectors.credentials_list(), "known_hosts": selectors.known_hosts_list(),
    })


@operator_admin_required
@require_POST
def remove_host_key(request: HttpRequest, known_host_id: int) -> HttpResponse:
    known = get_object_or_404(KnownHost, pk=known_host_id)
    services.known_host_remove(known_host=known, by=request.user)
    messages.success(request, f"Pinned host key of {known.host}:{known.port} removed.")
    return redirect("provisioning:keys")


@operator_required
def node(request: HttpRequest, node_id: int) -> HttpResponse:
    try:
        node, jobs = selectors.node_jobs(node_id=node_id)
    except Node.DoesNotExist:
        raise Http404("No such node") from None
    return render(request, "provisioning/node.html", {
        "node": node, "jobs": jobs, "install": services.last_install(node=node),
    })


@operator_admin_required
def decommission(request: HttpRequest, node_id: int) -> HttpResponse:
    node = get_object_or_404(Node.objects.select_related("site"), pk=node_id)
    form = DecommissionForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            job = services.decommission_create(node=node, skip_ssh=form.cleaned_data["skip_ssh"], by=request.user)
        except services.ProvisioningError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect("provisioning:job", job_id=job.pk)
    return render(request, "provisioning/decommission.html", {
        "node": node, "form": form, "install": services.last_install(node=node),
        "allocations": selectors.allocations_to_release(node=node),
    })


@operator_admin_required
@require_POST
def acceptance(request: HttpRequest, node_id: int) -> HttpResponse:
    """Run the node's acceptance test again: after a failed one, or to end its cordons."""
    node = get_object_or_404(Node.objects.select_related("site"), pk=node_id)
    try:
        job = services.burn_in_create(node=node, by=request.user)
    except services.ProvisioningError as exc:
        messages.error(request, str(exc))
        return redirect("provisioning:node", node_id=node.pk)
    return redirect("provisioning:job", job_id=job.pk)
