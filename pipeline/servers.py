"""`distillery ui`: the Prefect server and the MLflow UI on loopback, stopped together."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.runtime import quiet_defaults
from pipeline.tracking import experiment_links, tracking_uri


def wait_healthy(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_servers(prefect_port, mlflow_port):
    """Start both servers on 127.0.0.1; returns [(name, url, process)] once both answer."""
    quiet_defaults()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    servers = [
        (
            "Prefect",
            f"http://127.0.0.1:{prefect_port}",
            f"http://127.0.0.1:{prefect_port}/api/health",
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
                "--analytics-off",
            ],
        ),
        (
            "MLflow",
            f"http://127.0.0.1:{mlflow_port}",
            f"http://127.0.0.1:{mlflow_port}/health",
            [
                str(bin_dir / "mlflow"),
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                tracking_uri(),
                "--workers",
                "1",
            ],
        ),
    ]
    started = []
    try:
        for name, url, health, cmd in servers:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            started.append((name, url, proc))
            wait_healthy(health, proc)
    except BaseException:
        stop_servers(started)
        raise
    return started


def stop_servers(started):
    for _, _, proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for _, _, proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def serve_uis(prefect_port, mlflow_port):
    # SIGTERM (a service manager, `kill`) stops both servers as Ctrl-C does, during start-up too, instead of
    # orphaning them (they run in their own sessions)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Ctrl-C too when started with SIGINT ignored (a background job of a non-interactive shell, nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = start_servers(prefect_port, mlflow_port)
    except KeyboardInterrupt:
        return  # start_servers has stopped what it started
    for name, url, _ in started:
        print(f"{name}: {url}")
    os.environ["DISTILLERY_MLFLOW_UI"] = f"http://127.0.0.1:{mlflow_port}"
    for experiment, url, fid_view in experiment_links():
        print(f"  {experiment}: {url}\n    FID over training of its current distill runs: {fid_view}")
    print(
        f"Flows reach the Prefect server with PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api. Ctrl-C stops both.",
        flush=True,
    )
    try:
        while all(proc.poll() is None for _, _, proc in started):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop_servers(started)
