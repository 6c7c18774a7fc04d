"""The review station in a real browser: ``rano-response review serve`` on a two-case phantom
worklist, driven by headless Chromium (Selenium) through the page's element ids.

Checked: a request without the token is refused when the server listens beyond loopback; the
slice views show the anatomy and the Grad-CAM overlay (the picture changes when the map is
switched off, and is not black); agree and override verdicts are saved and appear in
``review export``; two browser sessions as different reviewers keep their own case and save
concurrently without loss.

Needs Chromium, chromedriver and the web extra (trame-slicer, selenium); `.ci/run` installs them.
Without them these tests are skipped with a reason that says so (the only skip in the suite).
``RANO_UPDATE_SCREENSHOT=1`` copies the page's screenshot to Resources/Screenshots/.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import REPO, cli_command, cli_env, make_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    import trame_slicer  # noqa: F401

    WEB_PACKAGES = ""
except ImportError as e:
    WEB_PACKAGES = f"{e.name} is not installed (pip install -e '.[web]')"
if WEB_PACKAGES or not (CHROMIUM and DRIVER):
    pytest.skip("SKIPPED browser tests of the review station: "
                + (WEB_PACKAGES or "Chromium and chromedriver not found (apt install chromium chromium-driver)"),
                allow_module_level=True)

from PIL import Image  # noqa: E402  (trame-slicer's dependency)
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

SIDEBAR_PX = 400  # the page's left column (controls); the slice views are to its right
WINDOW = (1400, 900)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server on 0.0.0.0 without --token: it must generate one and print the address with it."""
    from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort
    from RANOResponseLib.web.router import free_port

    root = tmp_path_factory.mktemp("web")
    generate_cohort(root / "cohort", PhantomConfig(patients=2, seed=7, spacing=4.0, min_followups=1,
                                                   max_followups=1, quirks=False))
    bundle = make_bundle(root / "bundle")
    port = free_port()
    db = root / "review.sqlite"
    log = open(root / "serve.log", "w+")
    proc = subprocess.Popen([*cli_command(), "review", "serve", "--db", str(db), "--worklist", str(root / "cohort"),
                             "--host", "0.0.0.0", "--port", str(port), "--bundle", str(bundle), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    address = None
    deadline = time.monotonic() + 120
    while address is None and time.monotonic() < deadline:
        assert proc.poll() is None, (root / "serve.log").read_text()
        m = re.search(r"open: (http://\S+)", (root / "serve.log").read_text())
        address = m.group(1) if m else None
        time.sleep(0.2)
    assert address, "the server printed no address"
    token = re.search(r"\?token=(\S+)", address)
    assert token, f"listening beyond loopback without a token printed: {address}"
    yield {"url": f"http://127.0.0.1:{port}/", "token": token.group(1), "db": db, "root": root, "proc": proc}
    proc.terminate()
    proc.wait(30)
    log.close()


def _browser() -> webdriver.Chrome:
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _wait(driver, element_id: str, pattern: str, timeout: float = 240.0) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            text = _text(driver, element_id)
        except Exception:  # the page is still loading
            text = ""
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"#{element_id} never matched {pattern!r}; it says {text!r}")


def _open(server, reviewer: str) -> webdriver.Chrome:
    driver = _browser()
    driver.get(f"{server['url']}?token={server['token']}")
    _wait(driver, "status", r"^predicted")
    box = driver.find_element(By.ID, "reviewer")
    box.clear()
    box.send_keys(reviewer)
    return driver


def _views(driver) -> np.ndarray:
    """The slice views' part of a screenshot, RGB."""
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return np.asarray(img)[80:-40, SIDEBAR_PX:]


def _export(server, tmp_path) -> list[dict]:
    out = tmp_path / "labels.csv"
    subprocess.run([*cli_command(), "review", "export", "--db", str(server["db"]), "--out", str(out)],
                   check=True, env=cli_env(), capture_output=True)
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh))


def test_requests_without_the_token_are_refused(server):
    for url in (server["url"], f"{server['url']}?token=wrong-{server['token']}", f"{server['url']}ws",
                f"{server['url']}internal/status"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=30)
        assert e.value.code == 403, url


def test_views_show_the_overlay_and_verdicts_are_saved(server, tmp_path):
    driver = _open(server, "alice")
    try:
        probs = _text(driver, "probabilities")
        assert re.search(r"CR: 0\.\d+", probs) and "PD:" in probs, probs
        model_label = re.search(r"Network: (\w+)", probs).group(1)
        # the three opinions (review.opinions): measured here from the phantom's masks; the test
        # bundle has no suggestion model
        assert re.search(r"Measured: RANO \w+, RANO 2\.0 \w+", probs) and "Suggested: none (" in probs, probs
        assert _text(driver, "case-title").startswith("1/2")
        time.sleep(2)  # the views' frames arrive after the status text
        with_map = _views(driver)
        Select(driver.find_element(By.ID, "map")).select_by_value("none")
        time.sleep(2)
        anatomy = _views(driver)
        assert (anatomy.max(axis=2) > 40).mean() > 0.05, "the slice views are black"
        changed = np.abs(with_map.astype(int) - anatomy.astype(int)).max(axis=2) > 30
        assert changed.mean() > 0.01, "switching the Grad-CAM overlay off changed nothing: no overlay was shown"
        Select(driver.find_element(By.ID, "map")).select_by_value("gradcam")
        time.sleep(2)
        shot = tmp_path / "review-station.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("RANO_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, REPO / "Resources" / "Screenshots" / "review-station.png")

        driver.find_element(By.ID, "agree").click()
        driver.find_element(By.ID, "save").click()
        _wait(driver, "status", r"saved verdict \d+: .* by alice", 60)

        driver.find_element(By.ID, "next").click()
        _wait(driver, "case-title", r"^2/2")
        _wait(driver, "status", r"^predicted")  # the second case is predicted on the server
        override = next(c for c in ("PD", "SD", "PR", "CR") if c != model_label)
        Select(driver.find_element(By.ID, "override-class")).select_by_value(override)
        Select(driver.find_element(By.ID, "confidence")).select_by_value("2")
        driver.find_element(By.ID, "note").send_keys("margin grew")
        driver.find_element(By.ID, "save").click()
        _wait(driver, "status", rf"saved verdict \d+: .* {override} by alice", 60)
        driver.find_element(By.ID, "first-unreviewed").click()
        _wait(driver, "status", "all 2 cases are reviewed by alice", 30)
    finally:
        driver.quit()
    rows = {r["case_id"]: r for r in _export(server, tmp_path) if r["reviewer"] == "alice"}
    assert len(rows) == 2
    first, second = sorted(rows.values(), key=lambda r: r["case_id"])
    assert (first["label"], first["agree"], first["model_label"]) == (model_label, "1", model_label)
    assert (second["label"], second["agree"], second["confidence"], second["note"]) == (override, "0", "2",
                                                                                       "margin grew")


def test_two_reviewers_keep_their_own_session_and_lose_nothing(server, tmp_path):
    from RANOResponseLib.review.store import ReviewStore

    with ReviewStore(server["db"]) as store:
        before = len(store.history())
    drivers = {name: _open(server, name) for name in ("carol", "dave")}
    try:
        drivers["carol"].find_element(By.ID, "next").click()
        _wait(drivers["carol"], "case-title", r"^2/2")
        _wait(drivers["carol"], "status", r"^predicted")
        assert _text(drivers["dave"], "case-title").startswith("1/2"), "one reviewer's click moved the other"
        labels = {"carol": "SD", "dave": "PR"}
        acknowledged = {name: 0 for name in drivers}
        for _round in range(3):
            for name, d in drivers.items():
                Select(d.find_element(By.ID, "override-class")).select_by_value(labels[name])
            barrier = threading.Barrier(len(drivers))
            errors: list[BaseException] = []

            def save(name: str) -> None:
                try:
                    barrier.wait()
                    drivers[name].find_element(By.ID, "save").click()
                    _wait(drivers[name], "status", rf"saved verdict \d+: .* by {name}", 60)
                    acknowledged[name] += 1
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=save, args=(n,)) for n in drivers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            for d in drivers.values():  # the next round's save must be acknowledged anew
                d.execute_script("document.getElementById('status').textContent = ''")
    finally:
        for d in drivers.values():
            d.quit()
    with ReviewStore(server["db"]) as store:
        history = store.history()
    assert len(history) - before == sum(acknowledged.values()) == 6
    rows = [r for r in _export(server, tmp_path) if r["reviewer"] in labels]
    assert sorted((r["reviewer"], r["label"], r["case_id"][:11]) for r in rows) == [
        ("carol", "SD", "Patient-002"), ("dave", "PR", "Patient-001")]
