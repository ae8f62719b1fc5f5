"""Xinference's web UI offers sglite: a real headless Chromium (Debian's ``chromium`` + ``chromedriver``, Selenium)
drives the UI of a real ``xinference-local`` (fixtures of ``xinference_server.py``; default settings, auth off).

Path through the UI, as a user clicks it: ``/ui/`` (Xinference 4.1 serves its Next.js UI at ``/`` and redirects the
old ``/ui/`` there, which lands on Launch Model) -> the "Custom Models" tab -> the card of the registered tiny model
-> its "Launch" button -> the launch dialog -> the "Model Engine" select. Built-in families are reached through the
search box of the "Language Models" tab. The dialog asks ``GET /v1/engines/{model}`` (plus
``?enable_virtual_env=true|false`` once the user picks a value under Advanced Configuration -> Model Virtual
Environments) and renders every engine as an option, disabled with the engine's reason where it cannot serve.

Screenshots go to ``artifacts/webui/`` under the repository root (git-ignored) and are listed in the pytest summary.
Chromium is required: install it with ``scripts/install.sh --test`` (or ``apt-get install chromium
chromium-driver``); only ``SGLITE_SKIP_WEBUI=1`` skips this module. Every wait is bounded; the browser is quit at
the end. ``SGLITE_CHROMIUM`` / ``SGLITE_CHROMEDRIVER`` override the binaries' paths.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .xinference_server import Server

pytestmark = pytest.mark.skipif(
    os.environ.get("SGLITE_SKIP_WEBUI", "") not in ("", "0"), reason="SGLITE_SKIP_WEBUI is set"
)

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:  # a failure, not a skip: the [test] extra lists selenium
    webdriver = None
    _SELENIUM_ERROR = f"selenium is not installed ({e}): pip install -e '.[test]' (or scripts/install.sh --test)"

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "webui"
UI_TIMEOUT = 30  # seconds for any one thing to appear in the page
PAGE_LOAD_TIMEOUT = 60
BUILTIN = "qwen2.5-instruct"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--lang=en-US",  # the selectors below use the UI's English labels
]
INSTALL_HINT = (
    "install it with `scripts/install.sh --test` or `apt-get install -y chromium chromium-driver` "
    "(set SGLITE_SKIP_WEBUI=1 to skip the web UI test on purpose)"
)

# XPath of the dialog's parts (Radix dialog + the UI's own select, whose options render in a fixed popover).
DIALOG = "//*[@role='dialog'][.//*[@data-slot='dialog-title']]"
ENGINE_TRIGGER = ".//label[starts-with(normalize-space(.), 'Model Engine')]/following-sibling::div[1]/div"
FIELD_VALUE = ".//label[starts-with(normalize-space(.), '{label}')]/following-sibling::div[1]/div"
ENGINE_OPTIONS = "//*[@data-slot='select-dropdown']//button[@data-slot='select-option']"
VENV_RADIO = ".//div[@role='radiogroup'][.//button[@value='unset']]//button[@value='{value}']"


def _binary(env_var: str, name: str) -> str:
    path = os.environ.get(env_var) or shutil.which(name) or f"/usr/bin/{name}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"web UI test needs {name}, found no executable {path} (${env_var}, PATH): {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # the folder shows this run only
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator["webdriver.Chrome"]:
    if webdriver is None:
        pytest.fail(_SELENIUM_ERROR)
    chromium = _binary("SGLITE_CHROMIUM", "chromium")
    chromedriver = _binary("SGLITE_CHROMEDRIVER", "chromedriver")
    workdir = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=workdir, prefix='profile-')}")
    log = workdir / "chromedriver.log"
    # An explicit driver path: Selenium Manager (which would try to download one) never runs.
    service = Service(executable_path=chromedriver, log_output=str(log))
    try:
        drv = webdriver.Chrome(service=service, options=options)
    except WebDriverException as e:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"could not start {chromium} through {chromedriver}: {e.msg}\n{tail}\n{INSTALL_HINT}")
    try:
        drv.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        drv.set_script_timeout(UI_TIMEOUT)
        yield drv
    finally:
        drv.quit()


class UI:
    """The Launch Model page of one server, driven through ``driver``; every wait is bounded by ``UI_TIMEOUT``.

    A wait that times out saves ``failure-<step>.png`` next to the other screenshots and fails with its path.
    """

    def __init__(self, driver: "webdriver.Chrome", server: Server, artifacts: Path, record: Callable) -> None:
        self.d, self.server, self.artifacts, self.record = driver, server, artifacts, record

    # -- primitives --

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        assert self.d.save_screenshot(str(path)), f"could not save {path}"
        self.record("artifact", str(path))
        print(f"[webui] screenshot: {path}")
        return path

    def fail(self, message: str) -> None:
        step = re.sub(r"[^a-z0-9]+", "-", message.lower())[:60].strip("-")
        shot = self.artifacts / f"failure-{step}.png"
        self.d.save_screenshot(str(shot))
        pytest.fail(f"{message}\n  url: {self.d.current_url}\n  screenshot: {shot}\n  server log:\n"
                    f"{self.server.log_tail(20)}")

    def until(self, condition: Callable[[Any], Any], what: str, timeout: float = UI_TIMEOUT) -> Any:
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(condition)
        except TimeoutException:
            self.fail(f"timed out after {timeout}s waiting for {what}")

    def element(self, xpath: str, what: str, root: Any = None) -> "WebElement":
        """The first displayed element matching ``xpath`` (under ``root``), once there is one."""

        def found(_: Any) -> Any:
            for el in (root or self.d).find_elements(By.XPATH, xpath):
                if el.is_displayed():
                    return el
            return False

        return self.until(found, what)

    def click(self, el: "WebElement") -> None:
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        el.click()

    def requested(self, url_part: str) -> bool:
        """Whether the page fetched a URL containing ``url_part`` (Resource Timing entries: completed requests)."""
        names = self.d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        return any(url_part in n for n in names)

    def forget_requests(self) -> None:
        self.d.execute_script("performance.clearResourceTimings()")

    # -- pages --

    def open_launch_page(self) -> None:
        self.d.get(self.server.endpoint + "/ui/")
        self.until(lambda d: "/launch-model" in d.current_url, "/ui/ to land on the Launch Model page")
        self.element("//button[@role='tab'][normalize-space(.)='Custom Models']", "the Custom Models tab")

    def open_dialog_from_card(self, model_name: str) -> "WebElement":
        card = self.element(
            f"//h3[normalize-space(text())='{model_name}']/ancestor::*[@role='button'][1]", f"the card of {model_name}"
        )
        self.click(card.find_element(By.XPATH, ".//button[normalize-space(.)='Launch']"))
        dialog = self.element(DIALOG, f"the launch dialog of {model_name}")
        title = dialog.find_element(By.XPATH, ".//*[@data-slot='dialog-title']").text
        if title != model_name:
            self.fail(f"the launch dialog is titled {title!r}, expected {model_name!r}")
        return dialog

    def open_custom_model_dialog(self, model_name: str) -> "WebElement":
        self.open_launch_page()
        self.click(self.element("//button[@role='tab'][normalize-space(.)='Custom Models']", "the Custom Models tab"))
        self.until(lambda d: d.current_url.rstrip("/").endswith("/launch-model/custom"), "the custom models list")
        return self.open_dialog_from_card(model_name)

    def open_builtin_model_dialog(self, model_name: str) -> "WebElement":
        self.open_launch_page()
        search = self.element("//input[contains(@placeholder, 'Search')]", "the model search box")
        search.send_keys(model_name)
        return self.open_dialog_from_card(model_name)

    # -- the engine select --

    def engine_options(self, dialog: "WebElement", must_include: str = "sglite") -> dict[str, bool]:
        """Open the Model Engine select; ``{option text: enabled}`` once an option starting with ``must_include``
        is listed (the engine list arrives asynchronously). The dropdown is left open."""
        if not self.d.find_elements(By.XPATH, ENGINE_OPTIONS):
            self.click(self.element(ENGINE_TRIGGER, "the Model Engine select", root=dialog))
        seen: dict[str, bool] = {}

        def listed(_: Any) -> Any:
            seen.clear()
            for opt in self.d.find_elements(By.XPATH, ENGINE_OPTIONS):
                seen[opt.get_attribute("textContent").strip()] = opt.get_attribute("disabled") is None
            return any(text.startswith(must_include) for text in seen) and dict(seen)

        try:
            return WebDriverWait(self.d, UI_TIMEOUT, poll_frequency=0.2).until(listed)
        except TimeoutException:
            self.fail(f"no {must_include!r} among the Model Engine options {sorted(seen)}")

    def close_engine_options(self, dialog: "WebElement") -> None:
        self.click(self.element(ENGINE_TRIGGER, "the Model Engine select", root=dialog))  # the trigger toggles
        self.until(lambda d: not d.find_elements(By.XPATH, ENGINE_OPTIONS), "the engine dropdown to close")

    def field_value(self, dialog: "WebElement", label: str) -> str:
        return dialog.find_element(By.XPATH, FIELD_VALUE.format(label=label)).text.strip()

    def set_virtual_env(self, dialog: "WebElement", model_name: str, value: str) -> None:
        """Advanced Configuration -> Model Virtual Environments = ``value``; waits for the dialog's engine query."""
        if not any(r.is_displayed() for r in dialog.find_elements(By.XPATH, VENV_RADIO.format(value=value))):
            self.click(self.element(".//*[normalize-space(text())='Advanced Configuration']", "Advanced", dialog))
        self.forget_requests()
        self.click(self.element(VENV_RADIO.format(value=value), f"the virtual env radio {value!r}", dialog))
        query = f"/v1/engines/{model_name}?enable_virtual_env={value}"
        self.until(lambda d: self.requested(query), f"the dialog to fetch {query}")


@pytest.fixture
def ui(driver, server: Server, artifacts: Path, record_property) -> UI:
    return UI(driver, server, artifacts, record_property)


def test_launch_dialog_of_registered_model_offers_sglite(ui: UI, custom_model: str) -> None:
    dialog = ui.open_custom_model_dialog(custom_model)
    options = ui.engine_options(dialog)
    ui.screenshot("custom-model-engine-options")
    assert options.get("sglite") is True, f"sglite is not an enabled engine option: {options}"

    # Choosing it fills the spec the engine matched (the tiny model's only spec).
    ui.click(ui.element(f"{ENGINE_OPTIONS}[normalize-space(.)='sglite']", "the sglite option"))
    ui.until(lambda d: ui.field_value(dialog, "Model Engine") == "sglite", "Model Engine to show sglite")
    ui.until(lambda d: ui.field_value(dialog, "Model Format") == "pytorch", "Model Format to be filled")
    assert ui.field_value(dialog, "Model Size") == "0_001"
    assert ui.field_value(dialog, "Quantization") == "none"
    ui.screenshot("custom-model-sglite-selected")


def test_launch_dialog_of_builtin_family_offers_sglite_with_virtualenvs(ui: UI) -> None:
    """Built-in families list virtualenv packages per engine; sglite must not show up disabled because of that,
    whatever the user picks for Model Virtual Environments (unset = the server's default, which is on)."""
    dialog = ui.open_builtin_model_dialog(BUILTIN)
    options = ui.engine_options(dialog)
    assert options.get("sglite") is True, f"sglite is not an enabled engine option of {BUILTIN}: {options}"
    ui.close_engine_options(dialog)

    for value in ("true", "false"):
        ui.set_virtual_env(dialog, BUILTIN, value)
        if value == "true":
            ui.screenshot("builtin-model-virtualenv-true")  # the radio, scrolled into view by the click
        options = ui.engine_options(dialog)
        if value == "true":
            ui.screenshot("builtin-model-virtualenv-true-engine-options")
        assert options.get("sglite") is True, f"enable_virtual_env={value}: sglite not enabled: {options}"
        ui.close_engine_options(dialog)
