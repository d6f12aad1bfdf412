"""The demo in a real headless browser (Debian's chromium and chromium-driver, driven by selenium): type a prompt,
click Generate, and wait for a video that plays. The screenshot is kept in test-artifacts/."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts")
PLAYING = """
const video = document.querySelector('#accelerated-video video');
return video !== null && video.readyState >= 1 && video.duration > 0 ? video.duration : null;
"""


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "no chromium / chromedriver on the PATH (apt-get install chromium chromium-driver)"
        if os.environ.get("ACCEL_REQUIRE_BROWSER"):  # CI installs them: a missing browser there is a failure
            pytest.fail(reason)
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"  # selenium must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_generate_a_video_in_the_browser(demo_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_app.url)
    prompt = WebDriverWait(browser, 60).until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.clear()
    prompt.send_keys("a green square moving right")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    try:
        duration = WebDriverWait(browser, 300, poll_frequency=1).until(lambda b: b.execute_script(PLAYING))
        WebDriverWait(browser, 60).until(
            lambda b: "speedup" in b.find_element(By.CSS_SELECTOR, "#summary").text.lower()
            or "x;" in b.find_element(By.CSS_SELECTOR, "#summary").text)
    finally:
        os.makedirs(ARTIFACTS, exist_ok=True)
        browser.save_screenshot(os.path.join(ARTIFACTS, "demo-browser.png"))
    assert duration > 0
    summary = browser.find_element(By.CSS_SELECTOR, "#summary").text
    assert "unaccelerated" in summary and "PSNR" in summary


def test_picking_a_long_video_model_turns_frames_into_chunks(demo_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_app.url)
    model = WebDriverWait(browser, 60).until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#model input")))
    model.click()
    model.send_keys(Keys.CONTROL, "a")
    model.send_keys("shapes-long-video", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda b: "Chunks" in b.find_element(By.CSS_SELECTOR, "#length").text)
    assert browser.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value") == \
        "a blue square moving right"
