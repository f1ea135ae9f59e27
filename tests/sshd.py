"""A real OpenSSH server for the provisioning tests: Debian's /usr/sbin/sshd on 127.0.0.1, a free port, a fresh
host key and one authorized client key, all in a temporary directory.

Sessions get `PATH=<stub dir>:/usr/local/bin:/usr/bin:/bin` and `HOME=<temp home>`: stand-in commands in the stub
dir (`nvidia-smi` printing a real capture from tests/fixtures, or a failing `df`) take precedence over the
system's, and the account's own shell start-up files (root's ~/.bashrc on a developer machine) are not read.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import FIXTURES
from tests.conftest import require

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
DEFAULT_CAPTURE = "nvidia_smi_query_gpu_csv_h100_mig_590_idle.txt"

# Emulates `nvidia-smi --query-gpu=a,b,c --format=csv`: the requested columns of a real --query-gpu capture (which
# holds ~210 columns), in the requested order, as nvidia-smi prints them.
NVIDIA_SMI_STUB = """#!/usr/bin/python3
import csv, sys
capture = {capture!r}
args = sys.argv[1:]
query = [a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")]
if not query or "--format=csv" not in args:
    sys.stderr.write("stub nvidia-smi: only --query-gpu=... --format=csv is captured\\n")
    sys.exit(2)
with open(capture, newline="") as fh:
    rows = list(csv.reader(fh, skipinitialspace=True))
names = [h.split(" [")[0] for h in rows[0]]
wanted = query[0].split(",")
missing = [w for w in wanted if w not in names]
if missing:
    sys.stderr.write("Field \\"%s\\" is not a valid field to query.\\n" % missing[0])
    sys.exit(2)
cols = [names.index(w) for w in wanted]
for row in rows:
    print(", ".join(row[c] for c in cols))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    port: int
    root: Path
    stub_dir: Path
    home: Path
    client_key: Path  # OpenSSH private key authorized for root
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    proc: subprocess.Popen

    host = "127.0.0.1"
    user = "root"

    @property
    def host_fingerprint(self) -> str:
        out = subprocess.run([SSH_KEYGEN, "-lf", str(self.root / "host_ed25519.pub"), "-E", "sha256"],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[1]

    def stub(self, name: str, script: str) -> None:
        path = self.stub_dir / name
        path.write_text(script)
        path.chmod(0o755)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def keygen(path: Path, comment: str) -> None:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


def start_sshd(*, capture: str = DEFAULT_CAPTURE) -> Sshd:
    require(os.path.exists(SSHD) and os.access(SSHD, os.X_OK), "OpenSSH server (/usr/sbin/sshd)")
    require(os.path.exists(SSH_KEYGEN), "ssh-keygen")
    require(os.geteuid() == 0, "root (sshd must switch users)")
    require((FIXTURES / capture).is_file(), f"fixture {capture}")
    # sshd refuses to start without its privilege-separation directory (created by the init script normally).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tm-sshd-"))
    stub_dir, home = root / "stubs", root / "home"
    stub_dir.mkdir()
    home.mkdir()
    keygen(root / "host_ed25519", "test host")
    keygen(root / "client_ed25519", "tokenmill tests")
    (root / "authorized_keys").write_text((root / "client_ed25519.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {root / 'host_ed25519'}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv PATH={stub_dir}:/usr/local/bin:/usr/bin:/bin HOME={home}
LogLevel VERBOSE
""")
    stub = NVIDIA_SMI_STUB.format(capture=str(FIXTURES / capture))
    (stub_dir / "nvidia-smi").write_text(stub)
    (stub_dir / "nvidia-smi").chmod(0o755)
    log = open(root / "sshd.log", "wb")  # noqa: SIM115 -- the server's stderr for its whole life
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    log.close()
    server = Sshd(port=port, root=root, stub_dir=stub_dir, home=home, client_key=root / "client_ed25519",
                  host_key_pub=(root / "host_ed25519.pub").read_text().strip(), proc=proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("sshd did not start listening")


@pytest.fixture
def sshd():
    server = start_sshd()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
