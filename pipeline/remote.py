"""What the machines of a cluster share through the DVC remote, beside DVC's own objects: the checkpoints of a
running stage (so that another worker can resume it) and the dvc.lock entry a worker hands back to the coordinator.

Any DVC remote does (S3, SSH, a shared folder): the files go through DVC's own filesystem for it, under
`<remote>/distillery/`, a prefix DVC's objects (`files/md5/…`) never use.
"""

import json
import threading
from pathlib import Path

from pipeline.io import atomic_path

PREFIX = "distillery"
MANIFEST = "manifest.json"  # distillery/checkpoint.py: the list of a run's checkpoint files, written last


class Remote:
    """The default DVC remote of the repository at `root`; local paths are relative to `root`, and so are the keys."""

    def __init__(self, root):
        from dvc.repo import Repo

        self.root = Path(root)
        repo = Repo(str(root))
        try:
            remote = repo.cloud.get_remote()  # the default remote: an error naming `dvc remote add -d` when none
        finally:
            repo.close()
        self.fs, self.base = remote.fs, remote.path

    def path(self, *parts):
        return self.fs.join(self.base, PREFIX, *map(str, parts))

    def _parent(self, path):
        self.fs.makedirs(self.fs.parent(path), exist_ok=True)  # a folder remote needs it; object stores ignore it
        return path

    def put_json(self, key, data):
        self.fs.pipe_file(self._parent(self.path(key)), json.dumps(data).encode())

    def put_files(self, key, paths):
        """Upload the files (or folders' files) `paths` under `key`."""
        for path in paths:
            local = self.root / path
            for file in sorted(local.rglob("*")) if local.is_dir() else [local]:
                if file.is_file():
                    self.fs.put_file(str(file), self._parent(self.path(key, file.relative_to(self.root))))

    def get_files(self, key, paths):
        """Download what `put_files(key, paths)` uploaded into place, each file whole or not at all."""
        for path in paths:
            for remote in self._files(Path(key, path)):
                with atomic_path(self.root / self.fs.relpath(remote, self.path(key))) as tmp:
                    self.fs.get_file(remote, str(tmp))

    def get_json(self, key):
        try:
            return json.loads(self.fs.cat_file(self.path(key)))
        except FileNotFoundError:
            return None

    def push_checkpoints(self, directory, pushed):
        """Upload the checkpoint files the local manifest of `directory` lists and `pushed` (a set of their sha256
        this process uploaded) lacks, then the manifest; then remove remote files it no longer lists. Returns False
        when a file was rotated away meanwhile: the remote stays as it was, for the next call."""
        local = self.root / directory
        try:
            text = (local / MANIFEST).read_text()
        except FileNotFoundError:
            return False
        listed = json.loads(text)["checkpoints"]
        try:
            for entry in listed:
                if entry["sha256"] not in pushed:
                    self.fs.put_file(str(local / entry["file"]), self._parent(self.path(directory, entry["file"])))
                    pushed.add(entry["sha256"])
        except FileNotFoundError:
            return False
        self.fs.pipe_file(self.path(directory, MANIFEST), text.encode())
        keep = {entry["file"] for entry in listed} | {MANIFEST}
        for path in self._files(directory):
            if self.fs.name(path) not in keep:
                self.fs.rm_file(path)
        return True

    def pull_checkpoints(self, directory):
        """Download the remote checkpoints of `directory` when they go further than the local ones of the same run
        (or there are none); returns the nimg resumed from, or None. The manifest is written last, as locally."""
        remote = self.get_json(Path(directory, MANIFEST))
        if not remote or not remote["checkpoints"]:
            return None
        local_path = self.root / directory / MANIFEST
        local = json.loads(local_path.read_text()) if local_path.is_file() else None
        newest = remote["checkpoints"][-1]["nimg"]
        local_newest = local["checkpoints"][-1]["nimg"] if local and local["checkpoints"] else -1
        if local and (local["fingerprint"] != remote["fingerprint"] or local_newest >= newest):
            return None  # this clone's own states are as far, or of another configuration: the stage decides
        for entry in remote["checkpoints"]:
            with atomic_path(self.root / directory / entry["file"]) as tmp:
                self.fs.get_file(self.path(directory, entry["file"]), str(tmp))
        with atomic_path(local_path) as tmp:
            Path(tmp).write_text(json.dumps(remote, indent=2) + "\n")
        return newest

    def remove(self, key):
        """Delete the files under `key` (a stage's checkpoints once it ended, what a worker handed back once read)."""
        for path in self._files(key):
            self.fs.rm_file(path)

    def _files(self, key):
        """The remote files under `key` (a folder's, or the file itself); none when it does not exist."""
        path = self.path(key)
        if self.fs.isfile(path):
            return [path]
        try:
            return list(self.fs.find(path))
        except FileNotFoundError:
            return []


class CheckpointMirror:
    """While a stage runs, copy each new manifest of its checkpoint directory (with its files) to the remote, every
    `every` seconds and once more on the way out."""

    def __init__(self, remote, directory, every=2.0):
        self.remote, self.directory, self.every = remote, directory, every
        self._pushed, self._seen = set(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sync(self):
        manifest = self.remote.root / self.directory / MANIFEST
        stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
        if stamp is not None and stamp != self._seen and self.remote.push_checkpoints(self.directory, self._pushed):
            self._seen = stamp

    def _loop(self):
        while not self._stop.wait(self.every):
            self.sync()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sync()
