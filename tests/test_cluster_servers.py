"""`distillery cluster up` / `down` for real: PostgreSQL, SeaweedFS's S3 gateway, the Prefect server and the MLflow
tracking server on 127.0.0.1, used as a worker machine would use them (cluster.env): a Prefect flow lands in
PostgreSQL, an MLflow run in PostgreSQL and its artifact in the S3 bucket, a DVC repository pushes to the bucket and
a second clone pulls back the same bytes; nothing listens beyond loopback, and `down` leaves nothing running.

Slow (four servers, migrations of empty databases): `make test-cluster`."""

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, sh, tool_env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

DISTILLERY = str(BIN / "distillery")


def distillery_cluster(action, directory):
    started = time.time()
    result = subprocess.run(
        [DISTILLERY, "cluster", action, "--dir", str(directory)], env=tool_env(), capture_output=True, text=True
    )
    print(f"distillery cluster {action}: {time.time() - started:.1f} s (exit {result.returncode})")
    return result


def searchable_by_postgres(path):
    """PostgreSQL runs as the postgres user under root: it must traverse pytest's private (0700) temp directories."""
    if os.geteuid() == 0:
        for p in [path, *path.parents]:
            if not p.stat().st_mode & 0o001:
                p.chmod(p.stat().st_mode | 0o001)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(directory, cluster.json, cluster.env as a dict) of a cluster brought up by the CLI; down whatever happens."""
    d = tmp_path_factory.mktemp("cluster") / "c"
    d.mkdir()
    searchable_by_postgres(d)
    try:
        up = distillery_cluster("up", d)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "dvc remote add -d" in up.stdout and "endpointurl" in up.stdout
        printed = distillery_cluster("env", d).stdout
        assert printed == (d / "cluster.env").read_text()
        env = dict(line.removeprefix("export ").split("=", 1) for line in printed.splitlines())
        yield d, json.loads((d / "cluster.json").read_text()), {k: shlex.split(v)[0] for k, v in env.items()}
    finally:
        distillery_cluster("down", d)


def server(info, name):
    return next(s for s in info["servers"] if s["name"] == name)


def postgres(d, info, dbname):
    import psycopg2

    password = json.loads((d / "credentials.json").read_text())["postgres"]
    port = server(info, "PostgreSQL")["ports"][0]
    return psycopg2.connect(host="127.0.0.1", port=port, user="distillery", password=password, dbname=dbname)


def query(d, info, dbname, sql, args=()):
    conn = postgres(d, info, dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def s3(env):
    from botocore.session import get_session  # what DVC's S3 remote itself is built on: no boto3 needed

    return get_session().create_client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def test_prefect_keeps_its_state_in_postgres(cluster):
    d, info, env = cluster
    with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=10) as r:
        assert json.loads(r.read()) is True
    name = f"cluster-probe-{os.getpid()}"
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + "/flows/",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        flow_id = json.loads(r.read())["id"]
    assert query(d, info, "prefect", "SELECT id::text, name FROM flow WHERE name = %s", (name,)) == [(flow_id, name)]


def test_mlflow_run_lands_in_postgres_and_its_artifact_in_s3(cluster):
    d, info, env = cluster
    client_env = {**tool_env(), **env}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        client_env.pop(key)  # the server proxies artifacts: a client needs no S3 credentials
    script = (
        "import mlflow\n"
        "mlflow.set_experiment('cluster-probe')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('loss', 0.25, step=3)\n"
        "    mlflow.log_text('hello from a worker', 'notes/hello.txt')\n"
        "print(run.info.run_id)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=client_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[-1]
    rows = query(d, info, "mlflow", "SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,))
    assert rows == [("loss", 0.25, 3)]
    objects = s3(env).list_objects_v2(Bucket="distillery", Prefix="mlflow/").get("Contents", [])
    keys = [o["Key"] for o in objects if o["Key"].endswith(f"{run_id}/artifacts/notes/hello.txt")]
    assert len(keys) == 1, [o["Key"] for o in objects]
    body = s3(env).get_object(Bucket="distillery", Key=keys[0])["Body"].read()
    assert body == b"hello from a worker"


def test_dvc_pushes_to_the_bucket_and_a_clone_pulls_it_back(cluster, tmp_path):
    _, _, env = cluster
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    sh(["git", "init", "-q"], first)
    sh(["git", "config", "user.email", "test@example.com"], first)
    sh(["git", "config", "user.name", "test"], first)
    sh(["dvc", "init", "-q"], first)
    # the two commands `cluster up` prints, with what cluster.env holds
    sh(["dvc", "remote", "add", "-d", "cluster", env["DISTILLERY_DVC_REMOTE"]], first)
    sh(["dvc", "remote", "modify", "cluster", "endpointurl", env["AWS_ENDPOINT_URL"]], first)
    data = os.urandom(300_000)
    (first / "weights.bin").write_bytes(data)
    sh(["dvc", "add", "-q", "weights.bin"], first)
    sh(["git", "add", "-A"], first)
    sh(["git", "commit", "-qm", "weights"], first)
    sh(["dvc", "push"], first, extra_env=env)
    pushed = s3(env).list_objects_v2(Bucket="distillery", Prefix="dvc/").get("Contents", [])
    assert [o["Size"] for o in pushed if o["Size"] == len(data)], pushed
    sh(["git", "clone", "-q", str(first), str(second)], tmp_path)
    sh(["dvc", "pull"], second, extra_env=env)
    assert (second / "weights.bin").read_bytes() == data


def group_pids(pgid):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the process group is the 5th field, counted after the command name's closing parenthesis
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass  # gone meanwhile
    return pids


def socket_inodes(pid):
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening():
    """{inode: (address, port)} of every listening TCP socket on this machine, from /proc/net/tcp{,6}."""
    sockets = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            sockets[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return sockets


def cluster_listeners(info):
    """{server name: [(address, port)]} of the sockets its processes (its whole process group) listen on."""
    tables = listening()
    found = {}
    for s in info["servers"]:
        inodes = set().union(*(socket_inodes(pid) for pid in group_pids(s["pid"])))
        found[s["name"]] = sorted(tables[i] for i in inodes if i in tables)
    return found


def test_every_listening_socket_is_on_loopback(cluster):
    _, info, _ = cluster
    found = cluster_listeners(info)
    for s in info["servers"]:
        assert {port for _, port in found[s["name"]]} >= set(s["ports"]), (s, found[s["name"]])
    beyond = {name: [a for a in sockets if a[0] != "127.0.0.1"] for name, sockets in found.items()}
    assert not any(beyond.values()), beyond


def test_down_leaves_nothing_running(cluster):
    d, info, _ = cluster
    result = distillery_cluster("down", d)
    assert result.returncode == 0, result.stderr
    assert not [s["name"] for s in info["servers"] if group_pids(s["pid"])]
    ports = {port for s in info["servers"] for port in s["ports"]}
    assert not [a for a in listening().values() if a[1] in ports]
    assert not [f for port in ports for f in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock")]
    again = distillery_cluster("down", d)
    assert again.returncode == 0 and "no cluster is up" in again.stdout


def test_a_server_that_fails_stops_those_started_before_it(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    searchable_by_postgres(d)
    (d / "seaweedfs").write_text("a file where SeaweedFS keeps its volumes")  # it starts after PostgreSQL
    try:
        result = distillery_cluster("up", d)
        assert result.returncode == 1
        assert result.stderr.startswith("distillery cluster up: SeaweedFS did not start"), result.stderr
        assert not (d / "cluster.json").exists()
        running = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(d).encode() in read_or_empty(p)]
        assert not running, [read_or_empty(p) for p in running]
    finally:
        distillery_cluster("down", d)


def read_or_empty(path):
    try:
        return path.read_bytes()
    except OSError:
        return b""
