"""Start and stop the real servers the integration tier runs against, all on 127.0.0.1 with free ports.

* PostgreSQL: a throwaway cluster (initdb + pg_ctl) with scram password auth for a generated superuser, tuned for
  tests (fsync off, max_connections 200). Debian's binaries under /usr/lib/postgresql/*/bin are used; when they are
  missing and we are root they are installed with apt-get (CI runs as root), otherwise start-up fails with the
  command to run. PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` OS user, and its
  directory then lives outside pytest's tmp dir (pytest keeps /tmp/pytest-of-root at mode 0700, which `postgres`
  cannot traverse): a postgres-owned mkdtemp dir, linked from the tmp dir, whose log is copied back on teardown.
* S3: moto's server (`moto_server`), an S3-compatible endpoint. No real S3 server can be installed here: MinIO is
  neither in Debian nor on PyPI, so moto stands in for it. It accepts any access key/secret.
* MLflow: `mlflow server` with the PostgreSQL backend, proxied artifacts in the moto bucket and the basic-auth app.
  Clients get only the tracking URI and credentials: artifacts go through the server, so they need no S3 keys.
* Prefect: `prefect server start` on PostgreSQL (asyncpg) with PREFECT_SERVER_API_AUTH_STRING set, so the API
  wants an `Authorization: Basic base64(user:pass)` header; clients set PREFECT_API_AUTH_STRING to "user:pass".

Every server runs in its own session (process group) so that stopping it also stops its children (uvicorn workers,
flow-run subprocesses); logs stay in the tmp dir and their tail is part of any start-up failure.
"""

from __future__ import annotations

import base64
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tests.helpers import REPO, free_port

VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
# Settings of the developer's shell that would point servers or clients elsewhere.
_SCRUBBED_PREFIXES = ("MLFLOW_", "PREFECT_", "AWS_", "PG")

# Connection budget (max_connections=200). Prefect: one engine per event loop, pool 10 + overflow 10 (the server
# runs the API and its services in one loop; a second engine exists only briefly, e.g. for migrations).
# MLflow: per uvicorn worker a tracking, a registry and an auth engine, each pool 5 + overflow 5 -> 2 x 30 = 60.
# Leaves room for test clients (psycopg2) and 8 concurrent pipeline processes that talk HTTP, not SQL.
PG_MAX_CONNECTIONS = 200
PREFECT_POOL_SIZE, PREFECT_MAX_OVERFLOW = 10, 10
MLFLOW_POOL_SIZE, MLFLOW_MAX_OVERFLOW = 5, 5
MLFLOW_WORKERS = 2


class StartupError(RuntimeError):
    pass


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"<no log: {e}>"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without settings that point MLflow/Prefect/AWS/libpq elsewhere, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _fail(what: str, log: Path, why: str) -> StartupError:
    msg = f"{what} did not start: {why}\n--- tail of {log} ---\n{tail(log)}"
    print(msg, file=sys.stderr)
    return StartupError(msg)


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    what: str = "server",
    headers: dict[str, str] | None = None,
) -> None:
    """Poll `url` until it answers 2xx; fail early (with the log's tail) if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _fail(what, log, f"exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3):
                return
        except (OSError, urllib.error.HTTPError) as e:
            last = e
        time.sleep(0.3)
    raise _fail(what, log, f"{url} not healthy after {timeout:.0f}s (last: {last!r})")


def spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | str | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session with stdout+stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process group `proc` leads (it was started in its own session), SIGKILL it if still alive."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:  # not a group leader after all: signal the process alone
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # children that ignored SIGTERM while the leader exited
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _retry_ports(start: Callable[[int], object], what: str, attempts: int = 3):
    """Call start(port) with fresh free ports until it doesn't lose a port race with a parallel session."""
    for i in range(attempts):
        try:
            return start(free_port())
        except StartupError as e:
            if i == attempts - 1 or "in use" not in str(e).lower():
                raise
            print(f"{what}: port taken, retrying", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    root: Path
    log: Path
    startup_s: float = 0.0
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    def url(self, dbname: str = "postgres", driver: str = "postgresql") -> str:
        user, password = quote(self.user, safe=""), quote(self.password, safe="")
        return f"{driver}://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kw):
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            connect_timeout=10,
            **kw,
        )

    def stop(self) -> None:
        if self._stop:
            self._stop()
            self._stop = None


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def ensure_postgres_binaries() -> Path:
    """Debian's PostgreSQL server binaries; installs them with apt-get when missing and we are root."""
    bindir = _pg_bindir()
    if bindir:
        return bindir
    cmd = "apt-get install -y -q postgresql"
    if os.geteuid() != 0:
        raise StartupError(
            f"PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are missing and we are "
            f"not root: run `sudo apt-get update && sudo {cmd}`"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "postgresql"]
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
    bindir = _pg_bindir()
    if r.returncode != 0 or not bindir:
        raise StartupError(f"`{cmd}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return bindir


def start_postgres(
    tmp: Path, databases: tuple[str, ...] = ("mlflow", "mlflow_auth", "prefect"), user: str = "visionflow"
) -> Postgres:
    t0 = time.monotonic()
    bindir = ensure_postgres_binaries()
    as_root = os.geteuid() == 0
    tmp.mkdir(parents=True, exist_ok=True)
    if as_root:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise StartupError(
                "running as root but there is no `postgres` OS user to run the cluster as "
                "(reinstall Debian's postgresql-common)"
            ) from None
        root = Path(tempfile.mkdtemp(prefix="visionflow-pg-"))
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        (tmp / "postgres").symlink_to(root, target_is_directory=True)
        run_as = ["runuser", "-u", "postgres", "--"]
    else:
        root = tmp / "postgres"
        root.mkdir()
        run_as = []
    data, sock, log = root / "data", root / "sock", root / "postgres.log"
    password = secrets.token_hex(16)

    def as_pg(*cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, *cmd], capture_output=True, text=True, cwd=root, **kw)

    def cleanup() -> None:
        if log.exists():
            try:
                shutil.copy(log, tmp / "postgres.log")
            except OSError:
                pass
        if as_root:
            (tmp / "postgres").unlink(missing_ok=True)
            shutil.rmtree(root, ignore_errors=True)

    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if as_root:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        os.chmod(pwfile, 0o600)
    r = as_pg(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        user,
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    pwfile.unlink()
    if r.returncode != 0:
        cleanup()
        raise StartupError(f"initdb failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    if as_root:
        as_pg("mkdir", "-m", "0700", str(sock))
    else:
        sock.mkdir(mode=0o700)

    def start(port: int) -> Postgres:
        conf = (
            f"\n# visionflow integration tests\nlisten_addresses = '{HOST}'\nport = {port}\n"
            f"unix_socket_directories = '{sock}'\nmax_connections = {PG_MAX_CONNECTIONS}\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\n"
            "password_encryption = 'scram-sha-256'\n"
        )
        # postgresql.auto.conf is read last: a retry with another port just overwrites it
        r = as_pg("sh", "-c", f"cat > {data / 'postgresql.auto.conf'}", input=conf)
        if r.returncode != 0:
            raise StartupError(f"could not write postgresql.auto.conf: {r.stderr}")
        r = as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        if r.returncode != 0:
            raise _fail("postgres", log, f"pg_ctl start exited {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}")
        return Postgres(HOST, port, user, password, root, log)

    try:
        pg = _retry_ports(start, "postgres")
    except BaseException:
        cleanup()
        raise

    def stop_pg() -> None:
        as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
        cleanup()

    pg._stop = stop_pg
    try:
        conn = pg.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
    except BaseException:
        pg.stop()
        raise
    pg.startup_s = time.monotonic() - t0
    return pg


# ----------------------------------------------------------------------------------------------------------- S3


@dataclass
class S3:
    endpoint_url: str
    access_key: str
    secret_key: str
    buckets: dict[str, str]
    log: Path
    proc: subprocess.Popen = field(repr=False)
    region: str = "us-east-1"
    startup_s: float = 0.0

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def env(self) -> dict[str, str]:
        """What a process that talks to the bucket directly (DVC, mlflow server) needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.buckets.get(bucket, bucket), Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        stop(self.proc)


def start_s3(tmp: Path, buckets: tuple[str, ...] = ("mlflow", "dvc")) -> S3:
    t0 = time.monotonic()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "moto.log"

    def start(port: int) -> S3:
        proc = spawn([str(VENV_BIN / "moto_server"), "-H", HOST, "-p", str(port)], clean_env(), log)
        try:
            wait_http(f"http://{HOST}:{port}/moto-api/data.json", 60, proc, log, "moto_server")
        except BaseException:
            stop(proc)
            raise
        return S3(
            f"http://{HOST}:{port}",
            "AK" + secrets.token_hex(9).upper(),
            secrets.token_hex(20),
            {b: b for b in buckets},
            log,
            proc,
        )

    s3 = _retry_ports(start, "moto_server")
    try:
        client = s3.client()
        for b in buckets:
            client.create_bucket(Bucket=b)
    except BaseException:
        s3.stop()
        raise
    s3.startup_s = time.monotonic() - t0
    return s3


# ------------------------------------------------------------------------------------------------------- MLflow


@dataclass
class MLflowServer:
    uri: str
    username: str
    password: str
    log: Path
    proc: subprocess.Popen = field(repr=False)
    startup_s: float = 0.0

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def auth_header(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def stop(self) -> None:
        stop(self.proc)


def start_mlflow(
    tmp: Path, pg: Postgres, s3: S3, bucket: str = "mlflow", workers: int = MLFLOW_WORKERS, timeout: float = 180
) -> MLflowServer:
    t0 = time.monotonic()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "mlflow.log"
    admin_password = secrets.token_urlsafe(18)
    auth_ini = tmp / "basic_auth.ini"
    # '%' must be doubled for configparser's interpolation
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {pg.url('mlflow_auth').replace('%', '%%')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    os.chmod(auth_ini, 0o600)
    env = clean_env(
        **s3.env(),
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
        MLFLOW_AUTH_ADMIN_USERNAME="admin",
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
        MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=str(MLFLOW_POOL_SIZE),
        MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=str(MLFLOW_MAX_OVERFLOW),
        # the GenAI job runner (7 huey consumer processes) is not used by the pipeline
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )

    def start(port: int) -> MLflowServer:
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--backend-store-uri",
            pg.url("mlflow"),
            "--artifacts-destination",
            f"s3://{bucket}/artifacts",
            "--app-name",
            "basic-auth",
            "--workers",
            str(workers),
        ]
        proc = spawn(cmd, env, log, cwd=tmp)
        try:
            wait_http(f"http://{HOST}:{port}/health", timeout, proc, log, "mlflow server")
        except BaseException:
            stop(proc)
            raise
        return MLflowServer(f"http://{HOST}:{port}", "admin", admin_password, log, proc)

    srv = _retry_ports(start, "mlflow server")
    srv.startup_s = time.monotonic() - t0
    return srv


# ------------------------------------------------------------------------------------------------------ Prefect


@dataclass
class PrefectServer:
    api_url: str
    auth_string: str
    client_home: Path
    log: Path
    proc: subprocess.Popen = field(repr=False)
    startup_s: float = 0.0

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": self.auth_string,
            "PREFECT_HOME": str(self.client_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode()}

    def stop(self) -> None:
        stop(self.proc)


def start_prefect(tmp: Path, pg: Postgres, timeout: float = 180) -> PrefectServer:
    t0 = time.monotonic()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "prefect.log"
    auth_string = f"admin:{secrets.token_urlsafe(18)}"
    client_home = tmp / "client-home"
    client_home.mkdir(exist_ok=True)
    env = clean_env(
        PREFECT_HOME=str(tmp / "server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=pg.url("prefect", "postgresql+asyncpg"),
        PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE=str(PREFECT_POOL_SIZE),
        PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW=str(PREFECT_MAX_OVERFLOW),
        PREFECT_SERVER_API_AUTH_STRING=auth_string,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log.write_text(f"$ prefect server database upgrade -y\n{r.stdout}{r.stderr}")
    if r.returncode != 0:
        raise _fail("prefect server (database upgrade)", log, f"exited {r.returncode}")

    def start(port: int) -> PrefectServer:
        cmd = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ]
        proc = spawn(cmd, env, log, cwd=tmp)
        srv = PrefectServer(f"http://{HOST}:{port}/api", auth_string, client_home, log, proc)
        try:
            # /api/health is exempt from the auth check; /api/ready (auth'd here) means services are up
            wait_http(f"{srv.api_url}/health", timeout, proc, log, "prefect server")
            wait_http(f"{srv.api_url}/ready", 60, proc, log, "prefect server", headers=srv.auth_header())
        except BaseException:
            stop(proc)
            raise
        return srv

    srv = _retry_ports(start, "prefect server")
    srv.startup_s = time.monotonic() - t0
    return srv


# ------------------------------------------------------------------------------------------------------ clients


def server_env(*servers: object, base: dict[str, str] | None = None) -> dict[str, str]:
    """A client environment: `base` (default: the scrubbed os.environ) plus each server's env()."""
    env = dict(clean_env() if base is None else base)
    for s in servers:
        env.update(s.env() if hasattr(s, "env") else dict(s))
    return env


def start_worker(
    pool: str, env: dict[str, str], log_path: Path, limit: int | None = None, worker_type: str = "process"
) -> subprocess.Popen:
    """`prefect worker start` for `pool` in the repo root (so flows/ and src/ import); stop it with stop()."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", worker_type]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return spawn(cmd, env, Path(log_path), cwd=REPO)
