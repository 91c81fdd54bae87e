"""inference.py: the chat backend, and the real page in a headless browser.

The browser test needs the ``webui`` extra (gradio), selenium and a Chromium with its driver
(Debian: ``apt-get install chromium chromium-driver``); it is skipped when any is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlora.cli.webui import BASE_CHOICE, ChatBackend, main
from mlora.inference.generation import SamplingParams, generate
from mlora.inference.trained import load_trained
from tests.eval_support import ADAPTERS, trained  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = [
    name
    for name, present in [
        ("gradio", importlib.util.find_spec("gradio") is not None),
        ("selenium", importlib.util.find_spec("selenium") is not None),
        ("chromium", BROWSER is not None),
        ("chromedriver", DRIVER is not None),
    ]
    if not present
]


@pytest.fixture(scope="module")
def loaded(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    model, tokenizer = load_trained(str(tiny_model_dir), {n: out / n for n in ADAPTERS})
    return model, tokenizer


def test_backend_streams_the_generate_answer(loaded):
    model, tokenizer = loaded
    params = SamplingParams(max_new_tokens=16)
    backend = ChatBackend(model, tokenizer, {}, params)
    assert backend.choices == [*ADAPTERS, BASE_CHOICE]
    for choice, adapter in [("rev", "rev"), (BASE_CHOICE, None)]:
        steps = list(backend.stream("rev owl=", choice, params, use_template=True))
        expected = generate(model, tokenizer, [("rev owl=", adapter)], params)[0].text
        assert steps[-1] == expected
        assert len(steps) > 1 and all(expected.startswith(s) for s in steps)


def test_without_gradio_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["--base_model", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == "error: inference.py needs gradio: pip install 'mlora[webui]'\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"inference.py exited: {log.read_text(encoding='utf-8')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"inference.py did not serve {url} within {timeout} s")


# records every text the newest answer bubble shows, to check the page streams prefixes
OBSERVE = """
window.seen = [];
if (window.observer) window.observer.disconnect();
const bubbles = () => document.querySelectorAll('#chat [data-testid="bot"] .message-content');
const before = bubbles().length;
window.observer = new MutationObserver(() => {
  const bots = bubbles();
  if (bots.length > before) window.seen.push(bots[bots.length - 1].textContent);
});
window.observer.observe(
  document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
"""


@pytest.mark.skipif(bool(MISSING), reason=f"browser test needs: {', '.join(MISSING)}")
def test_chat_page_in_headless_browser(trained, tiny_model_dir, loaded, tmp_path):  # noqa: F811
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out, raw = trained
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    port = free_port()
    entry = [sys.executable, ROOT / "inference.py", "--base_model", tiny_model_dir, "--dir", out]
    log = (tmp_path / "server.log").open("w", encoding="utf-8")  # a pipe could fill and block
    server = subprocess.Popen(
        [*entry, "--config", config, "--port", str(port), "--max_new_tokens", "24"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
        },
    )
    options = Options()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", server, tmp_path / "server.log")
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        driver.implicitly_wait(30)
        driver.get(f"http://127.0.0.1:{port}/")
        model, tokenizer = loaded
        params = SamplingParams(max_new_tokens=24)

        def ask(choice: str, message: str, send_with_enter: bool) -> str:
            driver.find_element(By.CSS_SELECTOR, "#adapter input").click()
            option = f'#adapter li[data-testid="dropdown-option"][aria-label="{choice}"]'
            driver.find_element(By.CSS_SELECTOR, option).click()
            assert (
                driver.find_element(By.CSS_SELECTOR, "#adapter input").get_attribute("value")
                == choice
            )
            driver.execute_script(OBSERVE)
            box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
            box.send_keys(message)
            if send_with_enter:
                box.send_keys(Keys.ENTER)
            else:
                driver.find_element(By.CSS_SELECTOR, "#send").click()
            adapter = None if choice == BASE_CHOICE else choice
            prompt = (
                message + "=" if adapter else message
            )  # the config's template: "{instruction}="
            expected = generate(model, tokenizer, [(prompt, adapter)], params)[0].text
            bubbles = '#chat [data-testid="bot"] .message-content'

            def answered(_) -> bool:
                found = driver.find_elements(By.CSS_SELECTOR, bubbles)
                return bool(found) and found[-1].get_attribute("textContent") == expected

            try:
                WebDriverWait(driver, 30).until(answered)
            except Exception:
                shown = [
                    e.get_attribute("textContent")
                    for e in driver.find_elements(By.CSS_SELECTOR, bubbles)
                ]
                pytest.fail(f"page shows {shown!r}, generate says {expected!r}")
            seen = driver.execute_script("return window.seen")
            assert all(expected.startswith(text) for text in seen), seen
            assert any(0 < len(text) < len(expected) for text in seen), "no partial answer shown"
            return seen

        seen = ask("rev", "owl", send_with_enter=False)
        seen += ask(BASE_CHOICE, "rev owl=", send_with_enter=True)
        print(f"distinct texts the answer bubbles showed while streaming: {len(set(seen))}")
        users = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"] .message-content')
        assert [u.get_attribute("textContent") for u in users] == ["owl", "rev owl="]
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()
