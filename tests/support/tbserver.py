"""A real ``tensorboard`` process on a free loopback port, with gradwatch's dynamic plugin
loaded through its ``tensorboard_plugins`` entry point (as declared in setup.cfg)."""

from __future__ import annotations

import configparser
import contextlib
import importlib.metadata as md
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def declared_entry_point() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = cfg["options.entry_points"]["tensorboard_plugins"].strip().splitlines()
    (line,) = [ln for ln in lines if ln.strip().startswith("gradwatch")]
    return line.split("=", 1)[1].strip()


def entry_point_path(tmp: str) -> str | None:
    """A directory to put on PYTHONPATH so the entry point is visible, or None when the
    installed gradwatch already declares it (``pip install -e .`` of this tree)."""
    value = declared_entry_point()
    eps = md.entry_points(group="tensorboard_plugins")
    if any(ep.name == "gradwatch" and ep.value == value for ep in eps):
        return None
    # an editable install made before the entry point existed: publish the same entry
    # point from a distribution of another name, read from setup.cfg
    dist = os.path.join(tmp, "gradwatch_tb_entry-0.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: gradwatch-tb-entry\nVersion: 0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(f"[tensorboard_plugins]\ngradwatch = {value}\n")
    return tmp


def has_data_server() -> bool:
    """Whether TensorBoard's Rust data server is installed (``--load_fast=true`` works)."""
    try:
        from tensorboard_data_server import server_binary
    except ImportError:
        return False
    return server_binary() is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def get_json(url: str) -> Any:
    return json.loads(get(url)[2])


@contextlib.contextmanager
def tensorboard(logdir: str, tmp: str, timeout: float = 120,
                load_fast: bool = False, all_texts: bool = True,
                spec: bool = False) -> Iterator[str]:
    """Start TensorBoard on 127.0.0.1 and yield its base URL once the gradwatch plugin is
    listed as enabled; the process is ended on exit. ``load_fast``: read the logdir with
    TensorBoard's Rust data server (``tensorboard-data-server``) instead of its Python
    multiplexer. ``all_texts``: pass the README's ``--samples_per_plugin text=0`` (else
    TensorBoard keeps its default sample of text events). ``spec``: name the logdir with
    ``--logdir_spec gw:<logdir>`` (TensorBoard then gives plugins no logdir path)."""
    paths = [ROOT, entry_point_path(tmp), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    port = free_port()
    log = open(os.path.join(tmp, f"tensorboard-{port}.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main",
         *(["--logdir_spec", f"gw:{logdir}"] if spec else ["--logdir", logdir]),
         "--host", "127.0.0.1",
         "--port", str(port), f"--load_fast={str(load_fast).lower()}", "--reload_interval=0",
         *(["--samples_per_plugin=text=0"] if all_texts else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError("tensorboard exited: " + open(log.name).read()[-3000:])
            try:
                listing = get_json(url + "/data/plugins_listing")
                if listing.get("gradwatch", {}).get("enabled"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gradwatch plugin not enabled at {url} after {timeout}s: "
                                   + open(log.name).read()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
