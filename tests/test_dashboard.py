"""`devit-mq dashboard`: the page and its JSON over real processes, and a real headless Chromium that
watches an edge go from ready to down after a SIGKILL, then the aggregator's loss (the banner).

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when
it runs as root with apt-get) and selenium (the ``dev`` extra); without them it skips and says which
is missing. It leaves screenshots at ``tests/artifacts/dashboard.png`` (an edge down) and
``tests/artifacts/dashboard-unreachable.png``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from devit_mq.nodes.launcher import Launcher

from .runtime_helpers import images, make_bundle, one_error_line, write_topology

CLI = [sys.executable, "-m", "devit_mq.cli"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("DEVIT_MQ_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEVIT_MQ_CHROMEDRIVER", "/usr/bin/chromedriver")
# the network here is closed: without these, Chromium keeps trying to reach Google's services
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,760")


class DashboardProcess:
    """`devit-mq dashboard TOPOLOGY --port 0` as a subprocess; ``url`` once it listens."""

    def __init__(self, topo: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([*CLI, "dashboard", str(topo), "--port", "0", *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.err.append(line) for line in self.proc.stderr], daemon=True).start()
        line = self.lines.get(timeout=30)
        assert " on http://" in line, line + "".join(self.err)
        self.url = line.split(" on ", 1)[1].split()[0]

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "api/state", timeout=5) as r:
            return json.loads(r.read())

    def wait_state(self, check, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if check(state) or time.monotonic() > deadline:
                return state
            time.sleep(0.3)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.mark.timeout(60)
def test_dashboard_without_a_topology_running_shows_it_unreachable_and_stops_on_sigterm(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"))  # nothing started
    board = DashboardProcess(topo, "--timeout", "0.3")
    try:
        with urllib.request.urlopen(board.url, timeout=5) as r:
            html = r.read().decode()
        assert 'id="banner"' in html and 'id="diagram"' in html
        assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # no external asset
        state = board.wait_state(lambda s: s["reachable"] is not None)
        assert state["reachable"] is False and state["exit_code"] == 2
        assert [n["state"] for n in state["nodes"]] == ["unreachable"] * 3
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(board.url + "nope", timeout=5)
    finally:
        code = board.stop()
    assert code == 0, "".join(board.err)
    assert "dashboard stopped" in "".join(iter_queue(board.lines))


def iter_queue(q: queue.Queue) -> list[str]:
    out = []
    while not q.empty():
        out.append(q.get())
    return out


@pytest.mark.timeout(60)
def test_dashboard_port_in_use_and_malformed_topology_are_one_line_errors(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*CLI, "dashboard", str(topo), "--port", str(port)], capture_output=True, text=True,
                             timeout=30)
    assert out.returncode == 2 and "already in use" in one_error_line(out)
    (tmp_path / "bad.yaml").write_text("edges: [\n")
    out = subprocess.run([*CLI, "dashboard", str(tmp_path / "bad.yaml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "bad.yaml" in one_error_line(out)


def test_dashboard_rates_come_from_counter_deltas_and_a_restart_is_no_negative_rate(tmp_path):
    from devit_mq.nodes.dashboard import Dashboard
    from devit_mq.nodes.status import build_report, load
    from devit_mq.protocol import Status, Telemetry

    topo = load(write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle")))
    board = Dashboard(topo)

    def report(answered: int, images: int, heard: float = 0.2):
        nodes = {"aggregator": Telemetry(node="aggregator", counters={"answered": answered, "errors.overloaded": 1}),
                 "edge0": Telemetry(node="edge0", counters={"images": images}, bytes={"other->edge0": 10 * images}),
                 "edge1": Telemetry(node="edge1", counters={"images": images})}
        return build_report(topo, Status(ready=[0, 1], parts=2, nodes=nodes, last_heard_s=[heard, 9.0],
                                         silence_s=3.0))

    first = board.update(report(10, 20), now=100.0)
    assert first["nodes"][0]["now"]["answers_per_s"] is None  # nothing to compare with yet
    state = board.update(report(30, 60), now=102.0)
    agg, edge0, edge1 = state["nodes"]
    assert agg["now"]["answers_per_s"] == 10.0 and agg["now"]["errors_per_s"] == 0.0
    assert edge0["now"]["images_per_s"] == 20.0 and edge0["series"]["images_per_s"] == [None, 20.0]
    assert edge1["state"] == "down" and edge1["now"]["p50_ms"] is None
    links = {(link["from"], link["to"]): link for link in state["links"]}
    assert links[("clients", "edge0")]["bytes_per_s"] == 200.0 and links[("clients", "edge1")]["state"] == "down"
    restarted = board.update(report(2, 4), now=103.0)  # the aggregator started over: counters from 0
    assert restarted["nodes"][0]["now"]["answers_per_s"] == 0.0
    gone = board.update(build_report(topo, None, error="no connection"), now=104.0)
    assert gone["reachable"] is False and gone["nodes"][1]["series"]["images_per_s"][-1] is None


# -- the browser test -------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    missing = []
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        missing.append(f"Chromium ({CHROMIUM}; Debian package 'chromium')")
    if not (Path(CHROMEDRIVER).is_file() or shutil.which("chromedriver")):
        missing.append(f"chromedriver ({CHROMEDRIVER}; Debian package 'chromium-driver')")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    return f"headless browser test needs {' and '.join(missing)}" if missing else None


def _chromium(user_data_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")  # a fresh profile: nothing cached, nothing synced
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver")
    return webdriver.Chrome(service=Service(driver_path), options=options)


class Traffic:
    """A thread that classifies a few images every 0.2 s through ``client`` (which only it uses)."""

    def __init__(self, client) -> None:
        self.client = client
        self.answered = self.degraded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pred = self.client.predict(images(4), batch_size=2)
            self.answered += sum(a.ok for a in pred.answers)
            self.degraded += pred.degraded

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _node_states(driver) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#diagram [data-node]')]"
        ".map(e => [e.dataset.node, e.dataset.state]))")


@pytest.mark.timeout(90)
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_dashboard_in_headless_chromium_marks_a_killed_edge_down(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    # a Launcher used in-process supervises nothing: a killed node stays dead (no restart)
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        board = DashboardProcess(topo)
        driver = traffic = None
        try:
            driver = _chromium(profile)
            driver.get(board.url)
            wait = WebDriverWait(driver, 20, poll_frequency=0.2)
            wait.until(lambda d: _node_states(d).get("edge0") == "ready" and _node_states(d).get("edge1") == "ready")
            assert driver.find_element("id", "banner").get_attribute("data-state") == "ready"
            traffic = Traffic(launcher.client)  # light steady load: sparklines, link rates, degraded answers
            state = board.wait_state(lambda s: any((n["now"].get("images_per_s") or 0) > 0 for n in s["nodes"]))
            edge0 = next(n for n in state["nodes"] if n["name"] == "edge0")
            assert edge0["now"]["images_per_s"] > 0 and edge0["now"]["p50_ms"] > 0

            edge1 = next(p for p in launcher.processes if p.spec.name == "edge1")
            os.kill(edge1.proc.pid, signal.SIGKILL)
            edge1.proc.wait(10)
            WebDriverWait(driver, 20, poll_frequency=0.2).until(lambda d: _node_states(d).get("edge1") == "down")
            states = _node_states(driver)
            assert states["edge0"] == "ready" and states["aggregator"] == "ready", states
            assert driver.find_element("id", "banner").get_attribute("data-state") == "degraded"
            assert "edge1 down" in driver.find_element("id", "banner").text
            polls = int(driver.find_element("tag name", "body").get_attribute("data-polls"))
            wait.until(lambda d: int(d.find_element("tag name", "body").get_attribute("data-polls")) >= polls + 2)
            ARTIFACTS.mkdir(exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
            traffic.stop()
            assert traffic.answered > 0 and traffic.degraded > 0

            aggregator = next(p for p in launcher.processes if p.spec.name == "aggregator")
            os.kill(aggregator.proc.pid, signal.SIGKILL)
            aggregator.proc.wait(10)
            wait.until(lambda d: d.find_element("id", "banner").get_attribute("data-state") == "unreachable")
            assert "Aggregator unreachable: aggregator at tcp://" in driver.find_element("id", "banner").text
            assert set(_node_states(driver).values()) == {"unreachable"}
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard-unreachable.png"))
        finally:
            if traffic is not None:
                traffic.stop()
            if driver is not None:
                driver.quit()
            assert board.stop() == 0, "".join(board.err)
