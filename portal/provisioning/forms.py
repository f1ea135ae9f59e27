import re

from django import forms

from portal.fleet.models import Site
from portal.provisioning.models import DEFAULT_INSTALL_DIR, JobStatus, SshCredential
from portal.provisioning.parsing import HostListError, known_hosts_lookup, parse_host_lines
from portal.provisioning.ssh import KeyFormatError, load_pkey_file, normalize_private_key

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
# Directories an install dir may not be (it is removed with rm -rf on decommissioning); refused, never written.
_SYSTEM_DIRS = {
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
    "/sys", "/tmp", "/usr", "/usr/local", "/var", "/var/lib", "/var/tmp",  # noqa: S108
}
MAX_KEY_BYTES = 64 * 1024
MAX_HOSTS = 200
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def validate_install_dir(value: str) -> str:
    value = value.rstrip("/") or "/"
    if not _SAFE_PATH.match(value) or "/." in value or "//" in value:
        raise forms.ValidationError("Use an absolute path of letters, digits, '.', '_', '-' and '/' (no '..').")
    if value in _SYSTEM_DIRS:
        raise forms.ValidationError(f"{value} is a system directory; use a directory of its own such as "
                                    f"{DEFAULT_INSTALL_DIR}.")
    return value


class AddNodesForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.all(), empty_label=None)
    hosts = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5, "placeholder": "root@10.0.0.11:22 iad1-h100-01\n10.0.0.12"}),
        help_text="One node a line: [user@]host[:port] [node name]. IPv6 in brackets: root@[fd00::5]:22. "
                  "The node name (default: the host) is how the node appears in the fleet.",
    )
    default_user = forms.CharField(max_length=32, initial="root", help_text="For lines without user@")
    default_port = forms.IntegerField(min_value=1, max_value=65535, initial=22, help_text="For lines without :port")
    credential = forms.ModelChoiceField(queryset=SshCredential.objects.all(), empty_label=None, label="SSH key")
    known_hosts = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}), label="known_hosts (optional)",
        help_text="Host keys of these nodes in known_hosts format; hosts listed here need no confirmation. "
                  "The others show their fingerprint to confirm before anything runs.",
    )
    install_dir = forms.CharField(max_length=200, initial=DEFAULT_INSTALL_DIR)
    simulate_gpus = forms.IntegerField(
        min_value=0, max_value=64, initial=0, label="Simulate GPUs",
        help_text="0: the node's real GPUs. More: the agent simulates that many (hosts without GPUs, demos).",
    )
    portal_url = forms.URLField(max_length=500, assume_scheme="https", label="Portal URL",
                                help_text="How the nodes reach this portal")

    def clean_default_user(self) -> str:
        user = self.cleaned_data["default_user"].strip()
        if not _USER.match(user):
            raise forms.ValidationError("Not a valid user name.")
        return user

    def clean(self) -> dict:
        data = super().clean()
        if "hosts" not in data or "default_user" not in data or "default_port" not in data:
            return data
        try:
            hosts = parse_host_lines(data["hosts"], default_user=data["default_user"],
                                     default_port=data["default_port"])
        except HostListError as exc:
            self.add_error("hosts", exc.errors)
            return data
        if not hosts:
            self.add_error("hosts", "List at least one host.")
        elif len(hosts) > MAX_HOSTS:
            self.add_error("hosts", f"At most {MAX_HOSTS} hosts at once.")
        data["host_specs"] = hosts
        return data

    def clean_known_hosts(self) -> str:
        text = self.cleaned_data["known_hosts"]
        if text.strip():
            try:
                known_hosts_lookup(text, host="validate.invalid", port=22)
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
        return text

    def clean_install_dir(self) -> str:
        return validate_install_dir(self.cleaned_data["install_dir"])


class CredentialForm(forms.Form):
    name = forms.CharField(max_length=100)
    key_file = forms.FileField(required=False, label="Private key file",
                               help_text="OpenSSH or PEM; stored encrypted, never shown again")
    passphrase = forms.CharField(required=False, widget=forms.PasswordInput, strip=False,
                                 help_text="Only if the uploaded key is encrypted")
    key_path = forms.CharField(required=False, max_length=500, label="…or a key path on the portal host",
                               help_text="Read at each connection by the portal's worker (unencrypted key)")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if SshCredential.objects.filter(name=name).exists():
            raise forms.ValidationError("A key with this name exists.")
        return name

    def clean(self) -> dict:
        data = super().clean()
        upload, path = data.get("key_file"), (data.get("key_path") or "").strip()
        if bool(upload) == bool(path):
            self.add_error("key_file", "Upload a key file or give a key path (one of the two).")
            return data
        if upload:
            if upload.size > MAX_KEY_BYTES:
                self.add_error("key_file", "That file is too large to be a private key.")
                return data
            try:
                data["key_data"] = upload.read()
                normalize_private_key(data["key_data"], passphrase=data.get("passphrase") or "")
            except KeyFormatError as exc:
                self.add_error("key_file" if "passphrase" not in str(exc) else "passphrase", str(exc))
        else:
            if not path.startswith("/"):
                self.add_error("key_path", "Give an absolute path.")
                return data
            try:
                load_pkey_file(path)
            except KeyFormatError as exc:
                self.add_error("key_path", str(exc))
            data["key_path"] = path
        return data


class HostKeyConfirmForm(forms.Form):
    fingerprint = forms.CharField(max_length=80, widget=forms.HiddenInput)


class DecommissionForm(forms.Form):
    confirm = forms.BooleanField(label="Yes, decommission this node",
                                 help_text="Stops and removes its agent, revokes its credential, ends its allocations")
    skip_ssh = forms.BooleanField(required=False, label="The node is gone: do not connect to it",
                                  help_text="Only revoke, release and mark it in the portal")


class JobFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "Any status"), *JobStatus.choices], required=False)
