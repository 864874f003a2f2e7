"""Using the admin API and console as a person would: the API served for
real on 127.0.0.1, API tokens to sign in with, HTTP clients holding them, and
a headless Chromium.

Chromium is Debian's (``chromium`` and ``chromium-driver``, installed by
scripts/install-test-servers.sh), started with every background service off
and a fresh profile, so it reaches nothing but the server under test.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from services.admin.api import create_app
from services.admin.tokens import Role, TokenStore
from shared import db
from shared.settings import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "run scripts/install-test-servers.sh as root to install it"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
START_SECONDS = 10.0


def make_token(database_url: str, role: Role) -> str:
    """A new API token with the role; its name is unique to this call."""
    with db.connect(database_url) as conn:
        _info, token = TokenStore(conn).create(f"test-{uuid.uuid4().hex[:8]}", role)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve the app on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the admin API did not start; see the log above")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_SECONDS)
        sock.close()


@dataclass(frozen=True)
class AdminApi:
    """Clients of one running admin API: with an admin token, a read-only
    token, and none."""

    base_url: str
    admin: httpx.Client
    reader: httpx.Client
    anonymous: httpx.Client


@contextmanager
def admin_api(settings: Settings) -> Iterator[AdminApi]:
    with ExitStack() as stack:
        base = stack.enter_context(live_server(create_app(settings)))

        def client(role: Role | None) -> httpx.Client:
            headers = (
                bearer(make_token(settings.database_url.get_secret_value(), role))
                if role
                else {}
            )
            # trust_env=False: no proxy from the environment stands between
            # the test and the server on 127.0.0.1.
            return stack.enter_context(
                httpx.Client(
                    base_url=base, headers=headers, trust_env=False, timeout=30
                )
            )

        yield AdminApi(base, client(Role.ADMIN), client(Role.READ_ONLY), client(None))


@contextmanager
def chromium(trusted_keys: Sequence[str] = ()) -> Iterator[WebDriver]:
    """A headless Chromium with a profile of its own, removed afterwards.

    ``trusted_keys`` are SPKI hashes (``spki_hash``) of test servers'
    certificates that Chromium accepts although no public CA issued them.
    """
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            raise RuntimeError(f"{path} is missing; {INSTALL_HINT}")

    profile = tempfile.mkdtemp(prefix="mailroom-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if trusted_keys:
        flags.append(f"--ignore-certificate-errors-spki-list={','.join(trusted_keys)}")
    for flag in flags:
        options.add_argument(flag)
    # A driver path given here keeps Selenium from fetching one of its own.
    driver = webdriver.Chrome(
        service=ChromeService(executable_path=CHROMEDRIVER), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def spki_hash(cert_file: Path) -> str:
    """Base64 of the SHA-256 of a PEM certificate's public key, as Chromium
    wants it for --ignore-certificate-errors-spki-list."""
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(key).digest()).decode()


class Page:
    """The console in a browser, with waits instead of sleeps."""

    def __init__(self, driver: WebDriver, artifacts: Path, timeout: float = 10.0):
        self.driver = driver
        self.artifacts = artifacts
        self.timeout = timeout
        artifacts.mkdir(parents=True, exist_ok=True)

    def wait_for(self, css: str) -> WebElement:
        """The first visible element matching ``css``, once there is one."""

        def found(driver: WebDriver) -> WebElement | None:
            for element in driver.find_elements("css selector", css):
                if element.is_displayed():
                    return element
            return None

        element = WebDriverWait(self.driver, self.timeout).until(
            found, f"nothing visible matched {css!r}"
        )
        assert isinstance(element, WebElement)
        return element

    def wait_until(self, what: str, check: Callable[[], bool]) -> None:
        WebDriverWait(self.driver, self.timeout).until(lambda _d: check(), what)

    def texts(self, css: str) -> list[str]:
        """The text of every element matching ``css``, read in one go so that
        a redraw of the page cannot happen in between."""
        found: list[str] = self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map((e) => e.innerText)",
            css,
        )
        return found

    def fill(self, css: str, value: str) -> None:
        element = self.wait_for(css)
        element.clear()
        element.send_keys(value)

    def choose(self, css: str, visible_text: str) -> None:
        Select(self.wait_for(css)).select_by_visible_text(visible_text)

    def click(self, css: str) -> None:
        self.wait_for(css).click()

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path
