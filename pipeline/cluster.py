"""`distillery cluster`: the servers a lab runs (PostgreSQL, SeaweedFS with its S3 gateway, the Prefect server,
the MLflow tracking server), started detached on 127.0.0.1 for a single-box trial, and stopped again."""

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.runtime import quiet_defaults
from pipeline.servers import wait_healthy

HOST = "127.0.0.1"
BUCKET = "distillery"
PG_BIN = Path(os.environ.get("DISTILLERY_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "distillery"  # the database role the servers log in as
GRACE_S = 30  # SIGTERM, then SIGKILL to what is left of a process group
HEALTH_TIMEOUT_S = 300  # the first start of Prefect and MLflow migrates an empty database


class ClusterError(Exception):
    pass


class ServerFailed(ClusterError):
    def __init__(self, server, log, cause):
        lines = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        super().__init__(f"{server} did not start ({cause}); the end of {log}:\n" + "\n".join(lines))


def free_ports(n):
    """n distinct ports free on 127.0.0.1 now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def as_postgres(cmd):
    """PostgreSQL refuses to run as root: its binaries run as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def give_to_postgres(path):
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def detached(cmd, log, env):
    """A server in its own session (its own process group), outliving `cluster up`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def credentials(d):
    """The PostgreSQL password and the S3 keys, made once: the data they guard outlives `down`."""
    path = d / "credentials.json"
    if not path.is_file():
        keys = {
            "postgres": secrets.token_hex(16),
            "s3_access": secrets.token_hex(10),
            "s3_secret": secrets.token_hex(20),
        }
        write_private(path, json.dumps(keys, indent=2))
    return json.loads(path.read_text())


def write_private(path, text):
    """Written whole (a reader never sees half a file) and readable by its owner only: it holds secrets."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def start_postgres(d, port, keys, started):
    data, log = d / "postgres", d / "logs" / "postgres.log"
    if os.geteuid() == 0 and subprocess.run(as_postgres(["test", "-x", str(d)])).returncode:
        raise ClusterError(f"the postgres user cannot reach {d}: make its parent directories searchable (o+x)")
    log.touch()
    give_to_postgres(log)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(exist_ok=True)
        pwfile = d / "postgres.pw"
        pwfile.write_text(keys["postgres"])
        give_to_postgres(data)
        give_to_postgres(pwfile)
        try:
            with open(log, "ab") as out:
                subprocess.run(
                    as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER, "-E", "UTF8"])
                    + ["--auth=scram-sha-256", f"--pwfile={pwfile}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                )
        finally:
            pwfile.unlink()
    options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories={data}"
    with open(log, "ab") as out:
        # pg_ctl puts the postmaster in its own session and -w waits until it accepts connections
        subprocess.run(
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60"])
            + ["start"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            check=True,
        )
    pid = int((data / "postmaster.pid").read_text().split()[0])
    started.append({"name": "PostgreSQL", "pid": pid, "ports": [port], "pgdata": str(data)})
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=port, user=PG_USER, password=keys["postgres"], dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    try:
        with conn.cursor() as cur:
            for db in ("prefect", "mlflow"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {db}")
    finally:
        conn.close()


def start_seaweedfs(d, ports, keys, started):
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    identities = {
        "identities": [
            {
                "name": "distillery",
                "credentials": [{"accessKey": keys["s3_access"], "secretKey": keys["s3_secret"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(d / "s3.json", json.dumps(identities, indent=2))
    (d / "seaweedfs").mkdir(exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "weed"),
        "server",
        f"-dir={d / 'seaweedfs'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",  # every listener (master, volume, filer, s3, their gRPC ports) on loopback
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",  # as many volumes as the free disk holds (the default 8 fills with two buckets)
        "-volume.preStopSeconds=1",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={d / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={d / 's3.sock'}",
        f"-s3.config={d / 's3.json'}",
    ]
    proc = detached(cmd, d / "logs" / "seaweedfs.log", os.environ)
    started.append({"name": "SeaweedFS", "pid": proc.pid, "ports": list(ports)})
    wait_healthy(f"http://{HOST}:{s3}/healthz", proc, HEALTH_TIMEOUT_S)
    s3_client = s3_client_for(f"http://{HOST}:{s3}", keys)
    if BUCKET not in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]:
        s3_client.create_bucket(Bucket=BUCKET)


def s3_client_for(endpoint, keys):
    from botocore.session import get_session  # what DVC's S3 remote itself is built on: no boto3 needed

    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=keys["s3_access"],
        aws_secret_access_key=keys["s3_secret"],
        region_name="us-east-1",
    )


def start_prefect(d, port, database_url, started):
    env = {
        **os.environ,
        "PREFECT_HOME": str(d / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",  # where its UI, in a browser, finds the API
    }
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    proc = detached(cmd + ["--analytics-off"], d / "logs" / "prefect.log", env)
    started.append({"name": "Prefect", "pid": proc.pid, "ports": [port]})
    wait_healthy(f"http://{HOST}:{port}/api/health", proc, HEALTH_TIMEOUT_S)


def start_mlflow(d, port, database_url, s3_endpoint, keys, started):
    # the server alone holds the S3 keys: clients send artifacts through it (--artifacts-destination)
    env = {
        **os.environ,
        "PGPASSWORD": keys["postgres"],  # libpq reads it: the password stays off the command line (ps)
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": keys["s3_access"],
        "AWS_SECRET_ACCESS_KEY": keys["s3_secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", HOST, "--port", str(port)]
    cmd += ["--backend-store-uri", database_url, "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"]
    proc = detached(cmd, d / "logs" / "mlflow.log", env)
    started.append({"name": "MLflow", "pid": proc.pid, "ports": [port]})
    wait_healthy(f"http://{HOST}:{port}/health", proc, HEALTH_TIMEOUT_S)


def up(directory):
    """Start the four servers; returns what cluster.json records. Stops what it started if one fails."""
    quiet_defaults()
    d = Path(directory).resolve()
    if (d / "cluster.json").exists():
        raise ClusterError(f"{d / 'cluster.json'} exists: run `distillery cluster down --dir {directory}` first")
    (d / "logs").mkdir(parents=True, exist_ok=True)
    keys = credentials(d)
    pg, *weed, prefect, mlflow = free_ports(11)
    s3_endpoint = f"http://{HOST}:{weed[6]}"
    login = f"{PG_USER}:{keys['postgres']}@{HOST}:{pg}"
    prefect_db, mlflow_db = (
        f"postgresql+asyncpg://{login}/prefect",
        f"postgresql+psycopg2://{PG_USER}@{HOST}:{pg}/mlflow",
    )
    started = []
    steps = [
        ("PostgreSQL", "postgres", lambda: start_postgres(d, pg, keys, started)),
        ("SeaweedFS", "seaweedfs", lambda: start_seaweedfs(d, weed, keys, started)),
        ("Prefect", "prefect", lambda: start_prefect(d, prefect, prefect_db, started)),
        ("MLflow", "mlflow", lambda: start_mlflow(d, mlflow, mlflow_db, s3_endpoint, keys, started)),
    ]
    try:
        for name, log, start in steps:
            try:
                start()
            except Exception as e:
                raise ServerFailed(name, d / "logs" / f"{log}.log", f"{type(e).__name__}: {e}") from e
    except BaseException:
        stop(started)
        raise
    info = {
        "directory": str(d),
        "servers": started,
        "urls": {
            "prefect_api": f"http://{HOST}:{prefect}/api",
            "mlflow": f"http://{HOST}:{mlflow}",
            "s3": s3_endpoint,
            "postgres": f"postgresql://{PG_USER}@{HOST}:{pg}",
        },
        "dvc_remote": f"s3://{BUCKET}/dvc",
    }
    env = {
        "PREFECT_API_URL": info["urls"]["prefect_api"],
        "MLFLOW_TRACKING_URI": info["urls"]["mlflow"],
        "AWS_ACCESS_KEY_ID": keys["s3_access"],
        "AWS_SECRET_ACCESS_KEY": keys["s3_secret"],
        "AWS_ENDPOINT_URL": s3_endpoint,  # boto3/botocore read it; DVC takes the endpoint from its remote config
        "AWS_DEFAULT_REGION": "us-east-1",
        "DISTILLERY_DVC_REMOTE": info["dvc_remote"],
    }
    write_private(d / "cluster.env", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    write_private(d / "cluster.json", json.dumps(info, indent=2))
    return info


def group_alive(pgid):
    try:
        os.waitpid(pgid, os.WNOHANG)  # a leader that is our own child (running()) is a zombie until reaped
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_groups(pgids):
    """SIGTERM to every process group at once, SIGKILL to what is left of them after GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while any(map(group_alive, pgids)) and time.time() < deadline:
            time.sleep(0.2)


def stop(servers):
    # together: SeaweedFS alone takes about 17 s (its filer's gRPC server waits 15 s for its own subscribers)
    stop_groups([s["pid"] for s in servers if "pgdata" not in s])
    for port in (port for s in servers if s["name"] == "SeaweedFS" for port in s["ports"]):
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):  # it leaves its gRPC unix sockets there
            sock.unlink()
    for server in servers:
        if "pgdata" in server:  # last, once its clients are gone
            subprocess.run(
                as_postgres([str(PG_BIN / "pg_ctl"), "-D", server["pgdata"], "-m", "fast", "-w", "stop"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stop_groups([server["pid"]])  # a no-op once pg_ctl has stopped it (the postmaster leads its session)


def down(directory):
    """Stop every server cluster.json lists; returns their names (none when nothing is up: safe to run twice)."""
    d = Path(directory).resolve()
    path = d / "cluster.json"
    if not path.is_file():
        return []
    servers = json.loads(path.read_text())["servers"]
    stop(servers)
    path.unlink()
    (d / "cluster.env").unlink(missing_ok=True)
    return [s["name"] for s in servers]


@contextmanager
def running(directory):
    """The cluster up for the body of the with-block, brought down whatever happens."""
    try:
        yield up(directory)
    finally:
        down(directory)


def print_up(directory, info):
    d = Path(info["directory"])
    for server in info["servers"]:
        print(f"{server['name']:<11} pid {server['pid']:<8} ports {', '.join(map(str, server['ports']))}")
    urls = info["urls"]
    print(f"Prefect API: {urls['prefect_api']}\nMLflow:      {urls['mlflow']}\nS3:          {urls['s3']}")
    print(f"\nOn a worker or coordinator: source {d / 'cluster.env'}   (logs: {d / 'logs'})")
    print("Point a DVC repository at the S3 remote (credentials come from the environment):")
    print(f"  dvc remote add -d cluster {info['dvc_remote']}\n  dvc remote modify cluster endpointurl {urls['s3']}")
    print(f"Stop: distillery cluster down --dir {directory}")
