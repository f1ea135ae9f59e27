"""Provisioning without an SSH server: parsers on real nvidia-smi captures, key encryption, forms, wheels, pages,
unreachable hosts and decommissioning a node that was enrolled by hand."""

import base64
import hashlib
import tomllib
import zipfile
from datetime import timedelta
from pathlib import Path

import paramiko
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from agents import config as agent_config
from portal.capacity.models import Allocation
from portal.capacity.services import allocation_create
from portal.fleet.models import NodeCredential, NodeStatus
from portal.provisioning import crypto, services, wheels
from portal.provisioning.models import JobKind, JobStatus, KnownHost, ProvisioningJob, SshCredential, StepStatus
from portal.provisioning.parsing import (
    HostListError,
    HostSpec,
    known_hosts_lookup,
    parse_df_available_mib,
    parse_host_lines,
    parse_os_release,
    parse_query_gpu_csv,
)
from portal.provisioning.steps import connect, install
from tests import FIXTURES
from tests.factories import (
    PASSWORD,
    GpuFactory,
    OperatorFactory,
    SiteFactory,
    TenantFactory,
    ViewerFactory,
    gpu_uuid,
    node_with_credential,
)
from tests.sshd import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Logins and user factories here are incidental; PBKDF2's deliberate slowness would dominate these tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def openssh_key(*, passphrase: bytes | None = None) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)


@pytest.fixture
def admin(client):
    user = OperatorFactory(username="olivia")
    client.login(username=user.username, password=PASSWORD)
    return user


@pytest.fixture
def credential(admin):
    return services.credential_create_upload(name="fleet key", key_data=openssh_key(), by=admin)


class TestParsing:
    @pytest.mark.parametrize(("capture", "name", "memory", "mig"), [
        ("nvidia_smi_query_gpu_csv_h100_590_idle.txt", "NVIDIA H100 80GB HBM3", 81559, False),
        ("nvidia_smi_query_gpu_csv_h100_mig_590_load.txt", "NVIDIA H100 80GB HBM3", 81559, True),
        ("nvidia_smi_query_gpu_csv_h200_mig_590_idle.txt", "NVIDIA H200", 143771, True),
    ])
    def test_it_reads_gpus_from_real_query_gpu_captures(self, capture, name, memory, mig):
        [gpu] = parse_query_gpu_csv((FIXTURES / capture).read_text())
        assert (gpu.index, gpu.name, gpu.memory_total_mib, gpu.mig_current, gpu.mig_pending) == (
            0, name, memory, mig, mig)
        assert gpu.driver_version == "590.48.01"
        assert gpu.uuid == "GPU-00000000-0000-0000-0000-000000000000"

    def test_it_reads_the_columns_preflight_asks_for(self):
        text = ("index, name, uuid, pci.bus_id, driver_version, memory.total [MiB], mig.mode.current, "
                "mig.mode.pending\n0, NVIDIA A100-SXM4-80GB, GPU-1, 00000000:07:00.0, 535.54.03, 81920 MiB, "
                "[N/A], [N/A]\n")
        [gpu] = parse_query_gpu_csv(text)
        assert (gpu.name, gpu.memory_total_mib, gpu.mig_current, gpu.pci_bus_id) == (
            "NVIDIA A100-SXM4-80GB", 81920, None, "00000000:07:00.0")

    @pytest.mark.parametrize("text", ["", "No devices were found\n", "index, name\n0\n"])
    def test_it_refuses_output_that_is_not_query_gpu_csv(self, text):
        with pytest.raises(ValueError, match="nvidia-smi"):
            parse_query_gpu_csv(text)

    def test_it_parses_a_batch_of_hosts(self):
        hosts = parse_host_lines(
            "# rack 4\nroot@10.0.0.11:2222 iad1-h100-01\n\n10.0.0.12\nubuntu@gpu-13.example.com\n"
            "admin@[fd00::5]:22 v6-node\n", default_user="root", default_port=22)
        assert hosts == [
            HostSpec("root", "10.0.0.11", 2222, "iad1-h100-01"), HostSpec("root", "10.0.0.12", 22, "10.0.0.12"),
            HostSpec("ubuntu", "gpu-13.example.com", 22, "gpu-13.example.com"),
            HostSpec("admin", "fd00::5", 22, "v6-node"),
        ]

    def test_it_names_every_bad_line(self):
        with pytest.raises(HostListError) as exc:
            parse_host_lines("10.0.0.1:99999\nok-host\n300.1.1.1\nok-host\nroot@h x y",
                             default_user="root", default_port=22)
        assert exc.value.errors == [
            "line 1: port '99999' must be a number from 1 to 65535",
            "line 3: '300.1.1.1' is not a valid host name or address",
            "line 4: ok-host:22 is listed twice",
            "line 5: expected [user@]host[:port] and an optional node name",
        ]

    def test_it_reads_df_and_os_release(self):
        df = ("Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
              "/dev/nvme0n1p2   102687672 52585272  50102400      52% /\n")
        assert parse_df_available_mib(df) == 48928
        assert parse_os_release('NAME="Ubuntu"\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n') == (
            "Ubuntu 22.04.4 LTS")

    def test_it_finds_a_host_in_known_hosts_plain_bracketed_and_hashed(self):
        key = paramiko.RSAKey.generate(1024)
        line = f"{key.get_name()} {key.get_base64()}"
        hashed = paramiko.HostKeys.hash_host("[10.0.0.7]:2222")
        text = f"# comment\n10.0.0.5 {line}\n[10.0.0.6]:2200 {line}\n{hashed} {line}\n"
        assert [k.get_base64() for k in known_hosts_lookup(text, host="10.0.0.5", port=22)] == [key.get_base64()]
        assert len(known_hosts_lookup(text, host="10.0.0.6", port=2200)) == 1
        assert len(known_hosts_lookup(text, host="10.0.0.7", port=2222)) == 1
        assert known_hosts_lookup(text, host="10.0.0.6", port=22) == []
        with pytest.raises(ValueError, match="known_hosts line 1"):
            known_hosts_lookup("not a host key\n", host="x", port=22)


class TestKeysAtRest:
    def test_it_stores_an_uploaded_key_encrypted_and_decrypts_it_for_ssh(self, credential):
        stored = SshCredential.objects.get()
        assert "PRIVATE KEY" not in stored.private_key_encrypted
        assert stored.public_key.startswith("ssh-ed25519 AAAA") and stored.fingerprint.startswith("SHA256:")
        pkey = connect.credential_pkey(stored)
        blob = base64.b64decode(stored.public_key.split()[1])
        assert pkey.asbytes() == blob
        assert stored.fingerprint == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    def test_it_decrypts_with_a_rotated_key_list_and_refuses_a_foreign_key(self, settings, credential):
        old = (settings.VAR_DIR / "provisioning_key").read_text().strip()
        settings.PROVISIONING_KEY = f"{Fernet.generate_key().decode()},{old}"
        assert connect.credential_pkey(SshCredential.objects.get()).get_name() == "ssh-ed25519"
        settings.PROVISIONING_KEY = Fernet.generate_key().decode()
        with pytest.raises(crypto.DecryptionError, match="PROVISIONING_KEY"):
            connect.credential_pkey(SshCredential.objects.get())

    def test_it_uploads_a_key_through_the_page(self, client, admin):
        upload = SimpleUploadedFile("id_ed25519", openssh_key(passphrase=b"open sesame"))
        r = client.post("/provisioning/keys/", {"name": "rack key", "key_file": upload, "passphrase": "open sesame"})
        assert r.status_code == 302
        assert SshCredential.objects.get().name == "rack key"

    @pytest.mark.parametrize(("data", "field", "message"), [
        ({"key_file": b"hello"}, "key_file", "not an OpenSSH or PEM private key"),
        ({"key_file": openssh_key(passphrase=b"secret")}, "passphrase", "the key is encrypted"),
        ({}, "key_file", "Upload a key file or give a key path"),
        ({"key_path": "/nonexistent/id_ed25519"}, "key_path", "cannot read /nonexistent/id_ed25519"),
    ])
    def test_it_names_the_field_of_a_bad_key(self, client, admin, data, field, message):
        post = {"name": "bad"}
        if "key_file" in data:
            post["key_file"] = SimpleUploadedFile("id", data["key_file"])
        post.update({k: v for k, v in data.items() if k != "key_file"})
        r = client.post("/provisioning/keys/", post)
        assert r.status_code == 200
        assert message in " ".join(r.context["form"].errors[field])
        assert SshCredential.objects.count() == 0


class TestAddNodes:
    def post(self, client, credential, **overrides):
        data = {"site": SiteFactory().pk, "hosts": "root@127.0.0.1:2222 a\n", "default_user": "root",
                "default_port": 22, "credential": credential.pk, "install_dir": "/opt/tokenmill-agent",
                "simulate_gpus": 0, "portal_url": "http://portal.example:8000", "known_hosts": ""}
        data.update(overrides)
        return client.post("/provisioning/new/", data)

    def test_it_shows_form_errors_naming_the_field_and_writes_nothing(self, client, credential):
        r = self.post(client, credential, hosts="10.0.0.1:0\n", install_dir="/etc")
        assert r.status_code == 200
        assert r.context["form"].errors["hosts"] == ["line 1: port '0' must be a number from 1 to 65535"]
        assert "/etc is a system directory" in r.context["form"].errors["install_dir"][0]
        r = self.post(client, credential, known_hosts="garbage\n")
        assert "known_hosts line 1" in r.context["form"].errors["known_hosts"][0]
        assert ProvisioningJob.objects.count() == 0

    def test_it_fails_an_unreachable_host_clearly(self, client, credential, django_capture_on_commit_callbacks):
        port = free_port()
        with django_capture_on_commit_callbacks(execute=True):
            r = self.post(client, credential, hosts=f"root@127.0.0.1:{port} gone-node\n")
        job = ProvisioningJob.objects.get()
        assert r["Location"] == f"/provisioning/jobs/{job.pk}/"
        assert job.status == JobStatus.FAILED
        assert job.error == f"cannot connect to 127.0.0.1:{port}: connection refused"
        assert job.steps.count() == 0
        page = client.get(r["Location"])
        assert job.error in page.content.decode() and b"Retry" in page.content

    def test_it_queues_hosts_listed_in_known_hosts_and_fails_on_connect(self, client, credential,
                                                                     django_capture_on_commit_callbacks):
        key = paramiko.RSAKey.generate(1024)
        port1, port2 = free_port(), free_port()
        hosts_text = f"[127.0.0.1]:{port1} {key.get_name()} {key.get_base64()}\n"
        with django_capture_on_commit_callbacks(execute=True):
            r = self.post(client, credential, hosts=f"127.0.0.1:{port1} n1\n127.0.0.1:{port2} n2\n",
                          known_hosts=hosts_text)
        assert r["Location"] == "/provisioning/"
        first, second = ProvisioningJob.objects.order_by("port")
        listed, unlisted = (first, second) if first.port == port1 else (second, first)
        assert KnownHost.objects.get().source == KnownHost.Source.KNOWN_HOSTS
        assert listed.steps.get(key="connect").status == StepStatus.FAILED
        assert listed.error == f"Connect (pinned host key): cannot connect to 127.0.0.1:{port1}: connection refused"
        assert unlisted.steps.count() == 0 and unlisted.status == JobStatus.FAILED

    def test_it_refuses_a_second_active_job_for_a_host(self, client, credential):
        self.post(client, credential)
        r = self.post(client, credential)
        assert r.context["form"].errors["hosts"] == ["a job is already active for 127.0.0.1:2222"]
        assert ProvisioningJob.objects.count() == 1


class TestHostKeyFlow:
    def job(self, credential, **kw):
        key = paramiko.RSAKey.generate(1024)
        defaults = {"site": SiteFactory(), "host": "10.0.0.9", "port": 22, "node_name": "n", "credential": credential,
                    "portal_url": "http://p", "created_at": timezone.now(), "offered_key_type": key.get_name(),
                    "offered_key_base64": key.get_base64(), "offered_fingerprint": "SHA256:offered"}
        return ProvisioningJob.objects.create(**{**defaults, **kw})

    def test_it_confirms_only_the_fingerprint_that_was_shown(self, client, admin, credential,
                                                            django_capture_on_commit_callbacks):
        job = self.job(credential)
        page = client.get(f"/provisioning/jobs/{job.pk}/").content.decode()
        assert "SHA256:offered" in page and "Confirm and start" in page
        r = client.post(f"/provisioning/jobs/{job.pk}/confirm-host-key/", {"fingerprint": "SHA256:other"})
        assert r.status_code == 302
        job.refresh_from_db()
        assert job.status == JobStatus.HOST_KEY and not KnownHost.objects.exists()
        with django_capture_on_commit_callbacks() as callbacks:
            client.post(f"/provisioning/jobs/{job.pk}/confirm-host-key/", {"fingerprint": "SHA256:offered"})
        job.refresh_from_db()
        assert job.status == JobStatus.QUEUED and len(callbacks) == 1
        known = KnownHost.objects.get()
        assert (known.host, known.port, known.key_base64, known.added_by) == ("10.0.0.9", 22, job.offered_key_base64,
                                                                            admin)

    def test_it_cancels_on_reject_and_retries_by_fetching_again(self, client, admin, credential,
                                                                 django_capture_on_commit_callbacks):
        job = self.job(credential)
        client.post(f"/provisioning/jobs/{job.pk}/reject-host-key/")
        job.refresh_from_db()
        assert job.status == JobStatus.CANCELLED and job.error == "host key SHA256:offered rejected by olivia"
        with django_capture_on_commit_callbacks() as callbacks:
            client.post(f"/provisioning/jobs/{job.pk}/retry/")
        job.refresh_from_db()
        assert job.status == JobStatus.HOST_KEY and job.offered_fingerprint == "" and len(callbacks) == 1

    def test_it_polls_while_active_and_stops_when_waiting_for_a_person_or_finished(self, client, admin, credential):
        job = self.job(credential, offered_fingerprint="", status=JobStatus.HOST_KEY)
        partial = client.get(f"/provisioning/jobs/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
        assert 'hx-trigger="every 1s"' in partial and "<html" not in partial
        for status, fingerprint in ((JobStatus.HOST_KEY, "SHA256:x"), (JobStatus.DONE, "")):
            ProvisioningJob.objects.filter(pk=job.pk).update(status=status, offered_fingerprint=fingerprint)
            partial = client.get(f"/provisioning/jobs/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
            assert "hx-trigger" not in partial
        listing = client.get("/provisioning/", HTTP_HX_REQUEST="true").content.decode()
        assert f'data-job="{job.pk}"' in listing and "hx-trigger" not in listing

    def test_it_cancels_a_queued_job(self, client, admin, credential):
        job = self.job(credential, status=JobStatus.QUEUED)
        client.post(f"/provisioning/jobs/{job.pk}/cancel/")
        job.refresh_from_db()
        assert job.status == JobStatus.CANCELLED and job.error == "cancelled by olivia"
        services.job_run(job_id=job.pk)  # a task that arrives after the cancel does nothing
        job.refresh_from_db()
        assert job.status == JobStatus.CANCELLED and job.steps.count() == 0


def test_it_refuses_viewers_the_admin_pages_and_actions(client, credential):
    viewer = ViewerFactory()
    client.login(username=viewer.username, password=PASSWORD)
    job = ProvisioningJob.objects.create(site=SiteFactory(), host="h", node_name="n", portal_url="http://p",
                                         created_at=timezone.now())
    assert client.get("/provisioning/").status_code == 200
    assert client.get(f"/provisioning/jobs/{job.pk}/").status_code == 200
    for url in ("/provisioning/new/", "/provisioning/keys/"):
        assert client.get(url).status_code == 403
    for action in ("cancel", "retry", "confirm-host-key", "reject-host-key"):
        assert client.post(f"/provisioning/jobs/{job.pk}/{action}/").status_code == 403
    client.logout()
    assert client.get("/provisioning/")["Location"] == "/accounts/login/?next=/provisioning/"


def test_it_decommissions_a_hand_enrolled_node_in_the_portal_only(client, admin, django_capture_on_commit_callbacks):
    node, _credential = node_with_credential(hostname="hand-made")
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name="NVIDIA H100 80GB HBM3")
    allocation = allocation_create(tenant=TenantFactory(), gpu=gpu, starts_at=timezone.now() - timedelta(days=1),
                                   by=admin)
    overview = client.get(f"/provisioning/nodes/{node.pk}/").content.decode()
    assert "This node was not installed from the portal" in overview
    assert f'href="/provisioning/nodes/{node.pk}/decommission/"' in overview
    page = client.get(f"/provisioning/nodes/{node.pk}/decommission/").content.decode()
    assert "No SSH: this node was not installed from the portal" in page and "End 1 current or future" in page
    r = client.post(f"/provisioning/nodes/{node.pk}/decommission/", {})
    assert "This field is required." in r.context["form"].errors["confirm"]
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/provisioning/nodes/{node.pk}/decommission/", {"confirm": "on"})
    job = ProvisioningJob.objects.get(kind=JobKind.DECOMMISSION)
    assert r["Location"] == f"/provisioning/jobs/{job.pk}/"
    assert job.status == JobStatus.DONE and job.skip_ssh
    assert [(s.key, s.status) for s in job.steps.order_by("position")] == [
        ("connect", StepStatus.SKIPPED), ("stop", StepStatus.SKIPPED), ("revoke", StepStatus.DONE),
        ("release", StepStatus.DONE), ("mark", StepStatus.DONE)]
    node.refresh_from_db()
    allocation.refresh_from_db()
    assert node.status == NodeStatus.DECOMMISSIONED
    assert allocation.ends_at is not None and allocation.ends_at <= timezone.now()
    assert not NodeCredential.objects.filter(node=node, revoked_at__isnull=True).exists()
    assert Allocation.objects.filter(ends_at__isnull=True).count() == 0
    r = client.post(f"/provisioning/nodes/{node.pk}/decommission/", {"confirm": "on"})
    assert r.context["form"].non_field_errors() == ["hand-made is already decommissioned"]


class TestAgentArtifacts:
    def test_it_builds_an_agent_wheel_without_django_or_pydantic(self):
        built = wheels.ensure_wheels()
        with zipfile.ZipFile(built.agent) as zf:
            names = zf.namelist()
            meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
            entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        requires = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines()
                          if line.startswith("Requires-Dist:"))
        assert requires == ["nvidia-ml-py>=12.560", "prometheus-client<1,>=0.20"]
        assert "Name: tokenmill-agent" in meta
        assert "tokenmill-agent = agents.cli:main" in entry_points
        assert {"agents/systemd/tokenmill-agent.service", "agents/agent.example.toml"} <= set(names)
        assert not [n for n in names if n.startswith("portal/")]
        assert {_name(w) for w in built.deps} == {"nvidia_ml_py", "prometheus_client"}

    def test_it_refuses_a_wheel_that_requires_django(self, tmp_path):
        wheel = tmp_path / "tokenmill_agent-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("tokenmill_agent-0.1.0.dist-info/METADATA",
                        "Metadata-Version: 2.1\nName: tokenmill-agent\nRequires-Dist: Django>=5\n")
        with pytest.raises(wheels.WheelError, match="requires \\['django'\\]"):
            wheels.check_agent_wheel(wheel)

    def test_it_writes_an_agent_config_the_agent_loads(self, tmp_path):
        text = install.agent_toml(portal_url="https://portal.example", state_dir="/opt/t/state",
                                   hostname='odd"name', simulate_gpus=4)
        cfg = agent_config.from_mapping(tomllib.loads(text))
        assert (cfg.portal_url, str(cfg.state_dir), cfg.hostname, cfg.simulate.gpus) == (
            "https://portal.example", "/opt/t/state", 'odd"name', 4)
        assert "[simulate]" not in install.agent_toml(portal_url="http://p", state_dir="/s", hostname="h",
                                                       simulate_gpus=0)

    def test_it_points_the_hardened_unit_at_the_install_dir(self):
        unit = install.unit_text(install_dir="/opt/tokenmill-agent")
        assert ("ExecStart=/opt/tokenmill-agent/venv/bin/tokenmill-agent run --config "
                "/opt/tokenmill-agent/agent.toml") in unit.splitlines()
        assert "DynamicUser=yes" in unit and "ProtectSystem=strict" in unit
        assert unit.count("ExecStart=") == 1


def _name(path: Path) -> str:
    return path.name.split("-", 1)[0]


def test_it_loads_a_key_file_from_the_portal_host(tmp_path, admin):
    path = tmp_path / "id_ed25519"
    path.write_bytes(openssh_key())
    credential = services.credential_create_path(name="on disk", path=str(path), by=admin)
    assert credential.private_key_encrypted == ""
    assert connect.credential_pkey(credential).get_name() == "ssh-ed25519"
