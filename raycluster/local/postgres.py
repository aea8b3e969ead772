"""The local platform's PostgreSQL: Debian's server binaries run as one more managed process
beside Ray, holding the agents' checkpoints (database ``agents``).

- Binaries: ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/<version>/bin``
  (Debian keeps them off PATH), else the folder of an ``initdb`` on PATH.
- Data: ``<state>/postgres/data``, created by ``initdb`` on the first ``up`` and reused on
  every later one, so the agents' threads survive ``rayplane down``/``up``.
- Secrets: the superuser's password is generated into ``<state>/postgres_password`` and the
  DSN into ``<state>/postgres_dsn`` (both mode 0600, like the cluster token); neither ever
  appears in a command line, ``state.json``, ``rayplane env`` or ``rayplane status``.
- Network: ``listen_addresses=127.0.0.1`` and SCRAM-SHA-256 password authentication for every
  connection (TCP and socket); the Unix socket lives in a short folder of the platform's own
  under /tmp (``rppg-<digest>``, mode 0700), never in the system's /var/run/postgresql.

Running as root: PostgreSQL refuses to run as root (a server bug or an SQL injection would own
the machine). Like a distribution's service does, rayplane then runs ``initdb`` and
``postgres`` as an unprivileged system account -- Debian's ``postgres`` account when it
exists, else ``nobody`` -- which owns the data and socket folders; nothing else changes owner.
That account must be able to reach the data folder: a state folder below a private folder
(``/root``, pytest's ``/tmp/pytest-of-root``) is not reachable, and then the data lives in
``/var/lib/rayplane/postgres-<digest>`` (linked from ``<state>/postgres/data``), the place a
system service keeps its data. Such a folder whose state folder is gone (its password, without
which the data cannot be opened, went with it) is removed at the next ``up``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from raycluster.errors import PlatformError
from raycluster.local.dashboard import raise_if_died
from raycluster.local.processes import ManagedProcess, log_tail
from raycluster.local.state import write_secret

#: The superuser ``initdb`` creates and the database the agents' checkpoints live in.
SUPERUSER = "rayplane"
DATABASE = "agents"
#: Every database ``wait_ready`` creates: the agents' and the feature store's online store
#: (features/store.py).
DATABASES = (DATABASE, "feast")
#: Where Debian installs each major version's server binaries.
DEBIAN_ROOTS = (Path("/usr/lib/postgresql"),)
#: Where a root-run platform keeps data its service account could not reach in the state folder.
SYSTEM_DATA_ROOT = Path("/var/lib/rayplane")
#: The unprivileged accounts PostgreSQL runs as when rayplane runs as root, in order.
SERVICE_ACCOUNTS = ("postgres", "nobody")
INSTALL_HINT = ("install PostgreSQL 15 (`make system-deps`, or `apt-get install postgresql-15`)")


@dataclass(frozen=True)
class ServiceUser:
    """The account PostgreSQL runs as when rayplane runs as root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict:
        """``subprocess`` arguments that run a child as this account, without root's groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def find_bindir(roots: Iterable[Path] | None = None) -> Path:
    """The folder holding ``initdb`` and ``postgres`` (``roots``: where to look for Debian's
    per-version folders, DEBIAN_ROOTS by default); PlatformError naming how to install them
    when there is none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             timeout=30, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    for root in DEBIAN_ROOTS if roots is None else roots:
        versions = [p for p in root.glob("*/bin") if p.parent.name.isdigit()]
        candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres")):
            return folder
    raise PlatformError(f"PostgreSQL's server binaries (initdb, postgres) were not found via "
                        f"pg_config or in /usr/lib/postgresql/*/bin; {INSTALL_HINT}")


def service_user(euid: int | None = None) -> ServiceUser | None:
    """The unprivileged account to run PostgreSQL as when rayplane runs as root; None when it
    does not (PostgreSQL then runs as the user running rayplane)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    for name in SERVICE_ACCOUNTS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return ServiceUser(name, entry.pw_uid, entry.pw_gid)
    raise PlatformError("rayplane runs as root and PostgreSQL refuses to: create an "
                        "unprivileged `postgres` account (useradd --system postgres)")


def reachable(path: Path, uid: int, gid: int) -> bool:
    """Whether an account (without supplementary groups) may search every folder from ``/``
    down to ``path`` (its deepest existing ancestor), by the mode bits."""
    path = path.resolve()
    folders = [p for p in (path, *path.parents) if p.exists()]
    for folder in folders:
        st = folder.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def initdb_argv(bindir: Path, data_dir: Path, pwfile: Path) -> list[str]:
    """Create the cluster: the ``rayplane`` superuser with the password in ``pwfile``,
    SCRAM-SHA-256 for every connection, UTF-8."""
    return [str(bindir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]


def postgres_argv(bindir: Path, data_dir: Path, port: int, socket_dir: Path) -> list[str]:
    """The server in the foreground (its log on stderr), on loopback only."""
    return [str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "password_encryption=scram-sha-256"]


def postgres_dsn(password: str, port: int, database: str = DATABASE) -> str:
    return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/{database}"


def redacted_dsn(port: int) -> str:
    return postgres_dsn("***", port)


class LocalPostgres:
    """PostgreSQL of the platform rooted at ``state_dir``, on ``127.0.0.1:port``."""

    def __init__(self, state_dir: Path, port: int):
        self.state_dir = Path(state_dir)
        self.port = port
        self._digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]

    # -- paths ----------------------------------------------------------------------------

    @property
    def password_path(self) -> Path:
        return self.state_dir / "postgres_password"

    @property
    def dsn_path(self) -> Path:
        return self.state_dir / "postgres_dsn"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "postgres" / "data"

    @property
    def system_data_dir(self) -> Path:
        """Where the data lives when a root-run platform's account cannot reach the state
        folder."""
        return SYSTEM_DATA_ROOT / f"postgres-{self._digest}"

    @property
    def socket_dir(self) -> Path:
        # Unix socket paths are limited to 107 bytes: a short folder of this platform's own.
        return Path("/tmp") / f"rppg-{self._digest}"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def password(self) -> str:
        return self.password_path.read_text().strip()

    def dsn(self, database: str = DATABASE) -> str:
        return postgres_dsn(self.password(), self.port, database)

    # -- preparing ------------------------------------------------------------------------

    def prepare(self, logs_dir: Path) -> list[str]:
        """Everything before the server starts: binaries, the password and DSN files, the
        socket folder and, the first time, ``initdb``. Returns the server's command line."""
        bindir = find_bindir()
        user = service_user()
        if not self.password_path.exists():
            if self._initialised(self.data_dir):
                raise PlatformError(f"{self.password_path} is missing but the PostgreSQL data "
                                    f"in {self.data_dir} needs it; remove that folder to start "
                                    f"over with an empty database")
            write_secret(self.password_path, os.urandom(24).hex())
        write_secret(self.dsn_path, self.dsn())
        self._own_folder(self.socket_dir, user)
        data = self._data_dir_for(user)
        if not self._initialised(data):
            self._initdb(bindir, data, user, logs_dir)
        return postgres_argv(bindir, data, self.port, self.socket_dir)

    @staticmethod
    def _initialised(data: Path) -> bool:
        return (data / "PG_VERSION").is_file()

    def _data_dir_for(self, user: ServiceUser | None) -> Path:
        """The data folder, created for ``user``: ``<state>/postgres/data``, or (root-run,
        state folder out of the account's reach) the system folder, linked from there."""
        link = self.data_dir
        link.parent.mkdir(parents=True, exist_ok=True)
        if user is None or link.is_symlink() or self._initialised(link) \
                or reachable(link.parent, user.uid, user.gid):
            data = link.resolve() if link.is_symlink() else link
        else:
            sweep_system_data()
            SYSTEM_DATA_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.system_data_dir.mkdir(mode=0o755, exist_ok=True)
            (self.system_data_dir / "state_dir").write_text(str(self.state_dir))
            data = self.system_data_dir / "data"
            if link.is_dir():  # left empty by an earlier start that failed
                link.rmdir()
            link.symlink_to(data, target_is_directory=True)
        self._own_folder(data, user)
        return data

    @staticmethod
    def _own_folder(folder: Path, user: ServiceUser | None) -> None:
        """A folder only PostgreSQL's account may enter (0700), refusing one somebody else
        made (the socket folder is in the world-writable /tmp)."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        uid = user.uid if user else os.geteuid()
        st = folder.lstat()
        if st.st_uid != uid:
            if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
                raise PlatformError(f"{folder} belongs to another user; remove it")
            os.chown(folder, uid, user.gid if user else -1)
        folder.chmod(0o700)

    def _initdb(self, bindir: Path, data: Path, user: ServiceUser | None,
                logs_dir: Path) -> None:
        pwfile = self.socket_dir / "initdb-password"
        write_secret(pwfile, self.password())
        log = logs_dir / "postgres-initdb.log"
        try:
            if user:
                os.chown(pwfile, user.uid, user.gid)
            with open(log, "ab") as out:
                res = subprocess.run(initdb_argv(bindir, data, pwfile), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(), cwd="/", timeout=300, check=False,
                                     **(user.popen_kwargs() if user else {}))
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise PlatformError(f"initdb failed (exit {res.returncode}); last log lines: "
                                f"{log_tail(log, 5)}")

    # -- readiness --------------------------------------------------------------------------

    def wait_ready(self, timeout: float, processes: Iterable[ManagedProcess],
                   logs: Path) -> None:
        """Wait until the server takes a password-authenticated connection, then create the
        ``agents`` and ``feast`` databases the first time; PlatformError when it does not within ``timeout``
        or when one of ``processes`` dies first."""
        import psycopg

        deadline = time.monotonic() + timeout
        error = "no answer"
        while time.monotonic() < deadline:
            raise_if_died(processes)
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=3,
                                     autocommit=True) as conn:
                    for name in DATABASES:
                        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                              (name,)).fetchone()
                        if not exists:
                            conn.execute(f"CREATE DATABASE {name}")
                    return
            except psycopg.OperationalError as err:
                error = " ".join(str(err).split())
                time.sleep(0.3)
        raise PlatformError(f"PostgreSQL did not take connections at {self.url} within "
                            f"{timeout:.0f}s ({error}); see the logs in {logs}")

    def wait_for_orphans(self, argv: list[str], timeout: float = 15.0) -> None:
        """Before a start: wait until the workers of a server that was killed (not stopped)
        are gone. They notice their postmaster's death within moments, but while one holds
        the shared memory a new server refuses to start. They are found by their working
        folder, the data folder (``argv``'s ``-D``), and never signalled."""
        data = os.path.realpath(argv[argv.index("-D") + 1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_cwd(pid) == data for pid in _pids()):
            time.sleep(0.1)

    def cleanup(self) -> None:
        """What ``down`` removes: the socket folder (the data and secrets stay)."""
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def server_env() -> dict[str, str]:
    """A small environment for initdb and the server: none of the platform's secrets, and
    no PG* variables of the caller's that would point them elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "TZ") or k.startswith("LC_") or k == "LANG"}
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def sweep_system_data(root: Path = SYSTEM_DATA_ROOT) -> list[Path]:
    """Remove the system data folders whose state folder lost its PostgreSQL password (the
    state folder was deleted): their data can no longer be opened. Returns what went."""
    removed = []
    for folder in root.glob("postgres-*"):
        try:
            owner = Path((folder / "state_dir").read_text().strip())
        except OSError:
            continue
        if not (owner / "postgres_password").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


__all__ = [
    "DATABASE",
    "DATABASES",
    "SUPERUSER",
    "LocalPostgres",
    "ServiceUser",
    "find_bindir",
    "initdb_argv",
    "postgres_argv",
    "postgres_dsn",
    "reachable",
    "redacted_dsn",
    "server_env",
    "service_user",
    "sweep_system_data",
]
