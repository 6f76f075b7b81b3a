"""The web console in a real browser (Chromium, driven by Playwright) against a whole
platform started as `shipyard up` starts it: a user signs in with their token, finds
their deployment, reads its card, instances, history, logs and charts, tries its API and
copies the call as cURL, creates a client key, writes its readme, and looks at its image;
another group's user sees none of it; nothing a user wrote runs as markup."""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from shipyard_gateway.console import SECURITY_HEADERS
from shipyard_gateway.http import DATA_PLANE_HEADERS
from shipyard_testing import wait_for_sync

from .conftest import admin_token, sy, two_teams

IRIS = str(Path(__file__).resolve().parent.parent / "examples" / "iris")
ROW = "[[5.1, 3.5, 1.4, 0.2]]"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"> for the shop"
README = """# Iris for the shop

Send **four** measurements; see `predict()`.

- [x] trained
- [ ] retrained
  - with more data

| field | unit |
|---|---|
| sepal | cm |

<script>document.title='pwned'</script>
[click me](javascript:document.title='pwned') and [docs](https://example.org/iris)
[hidden](\x01javascript:document.title='pwned') [data](data:text/html,pwned)
"""
# A line that makes a backtracking heading pattern take minutes: it must render at once.
SLOW_HEADING = "# a" + " " * 20_000 + "x\n"
# As the machine's probe starts Chromium: without the background-networking flags its
# connections to Google's hosts are refused by a closed network, many at a time.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The browser the tests drive: ``SHIPYARD_CHROMIUM``, else one on the PATH."""
    for candidate in (os.environ.get("SHIPYARD_CHROMIUM"), "chromium", "chromium-browser"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    pytest.fail(
        "the console's browser tests need Chromium: `./dev test` installs it "
        "(apt-get install chromium), or set SHIPYARD_CHROMIUM to a Chromium binary"
    )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


def gateway_url(home: Path) -> str:
    return str(json.loads((home / "config.json").read_text())["endpoints"]["gateway_http"])


def http(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def replay_curl(command: str, token: str) -> tuple[int, bytes]:
    """Runs a copied cURL command as a shell would parse it, with urllib instead of curl
    (which a machine need not have): method, URL, headers and body are the command's."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["curl", "-X"], words
    method, url, rest = words[2], words[3], words[4:]
    headers: dict[str, str] = {}
    data = None
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        if flag == "-H":
            key, _, val = value.partition(": ")
            headers[key] = val
        else:
            assert flag == "-d", words
            data = value.encode()
    # The token is left to the shell, never written into the copied command.
    assert headers["Authorization"] == "Bearer $SHIPYARD_TOKEN", headers
    headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, answer.read()


async def sign_in(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/console/#/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page.locator("#sign-out")).to_be_visible()


async def clipboard(page: Page) -> str:
    return str(await page.evaluate("navigator.clipboard.readText()"))


async def test_a_user_works_with_their_deployment_in_the_console(
    home: Path, browser: Browser
) -> None:
    expect.set_options(timeout=20_000)
    base = gateway_url(home)
    cleo, dan = two_teams(home, ("web-a", "web-b"), ("cleo", "dan"))
    built = sy(home, "image", "build", IRIS, "--name", "iris", token=cleo)
    assert built["build"]["state"] == "succeeded", built
    created = sy(
        home,
        *("deploy", "create", "iris-web", "--image", "iris:1", "--instance-type", "cpu.small"),
        *("--replicas", "1", "--description", HOSTILE, "--wait"),
        token=cleo,
    )
    assert created["status"] == "deployed", created
    bearer = {"Authorization": f"Bearer {cleo}", "Content-Type": "application/json"}
    for _ in range(3):
        status, _, _ = http(
            f"{base}/deployments/iris-web/predict", data=ROW.encode(), headers=bearer
        )
        assert status == 200
    # Wait until the logging service has the requests and the model server's output, so
    # the pages below have them at their first load.
    wait_for_sync(
        lambda: sy(home, "deploy", "metrics", "iris-web", token=cleo)["total"]["requests"] >= 3,
        timeout=30,
        interval=0.5,
        message="the requests never reached the metrics",
    )
    instance = sy(home, "deploy", "instances", "iris-web", token=cleo)[0]["instance_id"]

    # The console is at /, with a policy that runs only its own script.
    status, headers, page_html = http(f"{base}/")
    assert status == 200 and b'<main id="main">' in page_html
    assert headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert http(f"{base}/console/missing.js")[0] == 404

    context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Anything the page's own policy refuses (an inline style, a script) is a defect.
    page.on(
        "console",
        lambda message: errors.append(message.text) if "Security Policy" in message.text else None,
    )

    # A wrong token is refused with the reason; the right one signs in.
    await page.goto(f"{base}/")
    await page.fill("#token", "not-a-token")
    await page.click("button[type=submit]")
    await expect(page.locator("#flash")).to_contain_text("That token was refused")
    await page.fill("#token", cleo)
    await page.click("button[type=submit]")
    await expect(page.locator("#whoami")).to_have_text("cleo · web-a")

    # The list: her deployment, deployed; a search that matches nothing says so.
    row = page.locator("#deployments tr", has=page.locator("[data-deployment=iris-web]"))
    await expect(row.locator("[data-status]")).to_have_text("deployed")
    await expect(row).to_contain_text("iris:1")
    await page.fill("#search", "nothing-like-this")
    await expect(page.locator("#deployments")).to_contain_text("No deployment matches")
    await page.fill("#search", "iris")
    await page.click("[data-deployment=iris-web]")

    # The card; a description with markup is shown as the text it is.
    await expect(page.locator("#title")).to_have_text("iris-web")
    await expect(page.locator("#description")).to_have_text(HOSTILE)
    await expect(page.locator("#endpoint")).to_have_text(f"{base}/deployments/iris-web/predict")
    assert await page.locator("main img").count() == 0

    # Instances (the last 200) and history.
    instances = page.locator("#panel tbody tr")
    await expect(instances.first).to_contain_text(instance)
    await expect(instances.first.locator("[data-status]")).to_have_text("ready")
    await page.click("[data-tab=history]")
    await expect(page.locator("#panel tbody tr").last).to_contain_text("create")

    # Logs: the model server's output, per instance, copyable.
    await page.click("[data-tab=logs]")
    logs = page.locator("#log-lines")
    await expect(logs).to_contain_text("loaded")
    await expect(logs).to_contain_text(instance)
    await page.select_option("#log-instance", instance)
    await page.fill("#log-grep", "loaded")
    await page.press("#log-grep", "Enter")
    await expect(logs).to_have_attribute("data-shown", f"{instance}|loaded")
    shown = (await logs.text_content() or "").splitlines()
    assert shown and all("loaded" in line and instance in line for line in shown), shown
    await page.click("#copy-logs")
    await expect(page.locator("#copy-logs")).to_have_text("Copied")
    assert (await clipboard(page)).splitlines() == shown

    # Monitoring: the three requests, and charts drawn from the series.
    await page.click("[data-tab=monitoring]")
    await expect(page.locator("#m-requests")).to_have_text("3")
    await expect(page.locator("#m-success")).to_have_text("100.0%")
    # (Steps without requests have no success rate: a point is drawn only where some were.)
    success_chart = page.locator('[data-chart="Success rate (%)"]')
    assert int(await success_chart.get_attribute("data-points") or 0) >= 1
    assert await success_chart.locator("polyline, circle").count() >= 1

    # The API test: a prediction, the same call copied as cURL, then async.
    await page.click("[data-tab=api]")
    await page.fill("#api-body", ROW)
    await page.click("#api-send")
    await expect(page.locator("#api-answer-status")).to_have_text("HTTP 200")
    await expect(page.locator("#api-answer-body")).to_contain_text("setosa")
    await page.click("#api-copy-curl")
    copied = await clipboard(page)
    assert copied == await page.locator("#api-curl").text_content()
    assert cleo not in copied
    status, answer = replay_curl(copied, cleo)
    assert status == 200 and b"setosa" in answer
    await page.check("#api-async")
    assert "X-Async-Request: true" in (await page.locator("#api-curl").text_content() or "")
    await page.click("#api-send")
    await expect(page.locator("#api-answer-status")).to_have_text("HTTP 202")
    await expect(page.locator("#api-async-status [data-status]")).to_have_text("completed")
    await expect(page.locator("#api-async-result-body")).to_contain_text("setosa")

    # The Async tab lists that request, with its result.
    await page.click("[data-tab=async]")
    done = page.locator("#async-list tbody tr", has=page.locator("[data-status=completed]"))
    await done.first.locator("text=Result").click()
    await expect(page.locator("#async-result")).to_contain_text("setosa")

    # A batch job over files, started and followed in the Batch tab.
    inputs = home / "batch" / "in"
    inputs.mkdir(parents=True)
    for n in range(3):
        (inputs / f"row-{n}.json").write_text(ROW)
    await page.click("[data-tab=batch]")
    await page.fill("#batch-input", f"file://{inputs}/")
    await page.fill("#batch-output", f"file://{home}/batch/out/")
    await page.click("#batch-start")
    job = page.locator("#batch-list tbody tr").first
    await expect(job.locator("[data-status]")).to_have_text("completed")
    await expect(job).to_contain_text("3 done, 0 failed of 3")
    assert "setosa" in (home / "batch" / "out" / "row-0.json.out").read_text()

    # A client key: its secret is shown once and works as `curl -u client:secret`.
    await page.click("[data-tab=keys]")
    await page.fill("#key-client", "shop")
    await page.click("#key-create")
    secret = await page.locator("#key-secret-value").text_content() or ""
    assert secret.startswith("sk_"), secret
    await expect(page.locator("#panel tbody")).to_contain_text("shop")
    basic = base64.b64encode(f"shop:{secret}".encode()).decode()
    status, _, answer = http(
        f"{base}/deployments/iris-web/predict",
        data=ROW.encode(),
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
    )
    assert status == 200 and b"setosa" in answer
    await page.reload()  # the secret is not shown again
    await expect(page.locator("#panel tbody")).to_contain_text("shop")
    assert await page.locator("#key-secret-value").count() == 0

    # The readme, written in the console and rendered as GitHub-flavoured Markdown,
    # with a script and a javascript: link shown as text.
    await page.click("[data-tab=readme]")
    await page.click("#readme-edit")
    await page.fill("#readme-text", README + SLOW_HEADING)
    await page.click("#readme-save")
    readme = page.locator("#readme")
    await expect(readme.locator("h1").first).to_have_text("Iris for the shop")
    await expect(readme.locator("strong")).to_have_text("four")
    await expect(readme.locator("td").first).to_have_text("sepal")
    assert await readme.locator("input[type=checkbox]:checked").count() == 1
    await expect(readme.locator("ul ul li")).to_have_text("with more data")
    await expect(readme).to_contain_text("<script>document.title='pwned'</script>")
    assert await readme.locator("a").evaluate_all("links => links.map(a => a.href)") == [
        "https://example.org/iris"
    ]
    await expect(readme.locator("h1").last).to_contain_text("x", timeout=5_000)
    assert sy(home, "deploy", "readme", "iris-web", token=cleo)["markdown"] == README + SLOW_HEADING

    # The image card: its packages, who uses it, and its build log.
    await page.click("[data-nav=images]")
    await page.click("text=iris:1")
    await expect(page.locator("#title")).to_have_text("iris:1")
    await expect(page.locator("#panel")).to_contain_text("scikit-learn")
    await page.click("[data-tab=usage]")
    await expect(page.locator("#usage")).to_have_text("iris-web")
    await page.click("[data-tab=build-logs]")
    await expect(page.locator("#build-log")).to_contain_text("succeeded")

    # A deployment made in the console (scaled to zero: no instance to wait for), with a
    # mistake first; then updated, scaled and deleted there.
    await page.click("[data-nav=deployments]")
    await page.click("#new-deployment")
    await expect(page.locator("#new-image")).to_have_value("iris:1")
    await page.fill("#new-name", "Not A Name")
    await page.fill("#new-min", "0")
    await page.fill("#new-metadata", "team=shop")
    await page.click("#new-create")
    await expect(page.locator("#flash")).to_contain_text("is not a valid deployment name")
    await expect(page.locator("#new-name")).to_have_value("Not A Name")  # the form is kept
    await page.fill("#new-name", "iris-form")
    await page.fill("#new-description", "made in the console")
    await page.click("#new-create")
    await expect(page.locator("#title")).to_have_text("iris-form")
    await expect(page.locator("#description")).to_have_text("made in the console")
    await expect(page.locator("main")).to_contain_text("team = shop")
    await page.click("[data-tab=settings]")
    await page.fill("#edit-description", "changed in the console")
    await page.fill("#edit-message", "a clearer description")
    await page.click("#edit-save")
    await expect(page.locator("#description")).to_have_text("changed in the console")
    await expect(page.locator("#flash")).to_contain_text("Updated")
    await page.fill("#scale-max", "2")
    await page.click("#scale-save")
    await expect(page.locator("main")).to_contain_text("0\N{EN DASH}2 (autoscaled)")
    history = sy(home, "deploy", "history", "iris-form", token=cleo)
    assert [e["action"] for e in history][:3] == ["scale", "update", "create"], history
    assert history[1]["message"] == "a clearer description", history
    await page.click("#delete")
    await expect(page.locator("#delete")).to_have_text("Delete iris-form for good")
    await page.click("#delete")
    await expect(page.locator("#flash")).to_contain_text("iris-form is deleted")
    await expect(page.locator("#deployments")).not_to_contain_text("iris-form")
    await expect(page.locator("#deployments")).to_contain_text("iris-web")
    # A deleted deployment keeps its card, metadata, monitoring and readme.
    await page.check("#include-deleted")
    gone = page.locator("#deployments tr", has=page.locator("[data-deployment=iris-form]"))
    await expect(gone.locator("[data-status]")).to_have_text("deleted")
    await expect(gone).to_contain_text("team=shop")
    await gone.locator("[data-deployment=iris-form]").click()
    await expect(page.locator("h1 [data-status]")).to_have_text("deleted")
    assert await page.locator("[data-tab=settings], [data-tab=api], #action-start").count() == 0
    await page.click("[data-tab=monitoring]")
    await expect(page.locator("#m-requests")).to_have_text("0")
    await page.click("[data-tab=readme]")
    await expect(page.locator("#readme")).to_contain_text("has no readme yet")

    # Her group's quota and what uses it; setting quotas is for admins.
    await page.click("[data-nav=quotas]")
    await expect(page.locator("main tbody").first).to_contain_text("web-a")
    await expect(page.locator("main tbody").first).to_contain_text("iris-web")
    await expect(page.locator("main")).to_contain_text("cpu.small")
    assert await page.locator("[data-quota]").count() == 0
    assert "web-b" not in (await page.locator("main").text_content() or "")

    # Stop from the card; then, while the Logs tab follows, it starts again (by the CLI)
    # and the new instance's lines appear without a reload.
    await page.goto(f"{base}/console/#/deployments/iris-web")
    await page.click("#action-stop")
    await expect(page.locator("#flash")).to_contain_text("Stop: done")
    await expect(page.locator("h1 [data-status]")).to_have_text("stopped")
    await expect(page.locator("#action-start")).to_be_visible()
    await page.click("[data-tab=logs]")
    await expect(page.locator("#log-lines")).to_contain_text(instance)
    await page.check("#log-follow")
    sy(home, "deploy", "start", "iris-web", token=cleo)
    await page.wait_for_function(
        """old => document.getElementById("log-lines").textContent.split("\\n")
            .some(line => line.includes("loaded") && !line.includes(old))""",
        arg=instance,
        timeout=90_000,
    )
    await expect(page.locator("h1 [data-status]")).to_have_text("deployed", timeout=60_000)

    assert await page.title() == "Shipyard console"
    assert errors == []

    # Another group's user sees none of it, even by its address.
    await page.click("#sign-out")
    await sign_in(page, base, dan)
    await expect(page.locator("#search")).to_have_value("")  # cleo's filter went with her
    await expect(page.locator("#deployments")).to_contain_text("No deployment matches")
    await page.goto(f"{base}/console/#/deployments/iris-web")
    await expect(page.locator("#flash")).to_contain_text("does not exist")
    assert await page.locator("#description").count() == 0

    # An admin sets a group's quota in the console.
    await page.click("#sign-out")
    await sign_in(page, base, admin_token(home))
    await page.click("[data-nav=quotas]")
    form = page.locator("[data-quota=web-b]")
    await form.locator("[data-limit=cpu]").fill("1.5")
    await form.locator("[data-limit=instances]").fill("2")
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#flash")).to_contain_text("Quota of web-b saved")
    limits = sy(home, "quota", "show", "web-b")["limits"]
    assert (limits["cpu"], limits["instances"]) == (1.5, 2), limits
    assert errors == []
    await context.close()


def test_the_console_serves_only_its_own_files(home: Path) -> None:
    base = gateway_url(home)
    for path in ("/console/../settings.py", "/console/console.py", "/console/__init__.py"):
        status, _, body = http(f"{base}{path}")
        assert status == 404 and b"import" not in body, (path, status)
    for path in ("/console/", "/console/console.js", "/console/console.css"):
        status, headers, _ = http(f"{base}{path}")
        assert status == 200, path
        assert {k: headers[k] for k in SECURITY_HEADERS} == SECURITY_HEADERS, (path, headers)
    assert http(f"{base}/console/console.js")[1]["Content-Type"].startswith("text/javascript")
    # What a model answers is never a page on the console's origin.
    for path in ("/v2/health/live", "/deployments/nowhere/predict"):
        headers = http(f"{base}{path}")[1]
        assert {k: headers[k] for k in DATA_PLANE_HEADERS} == DATA_PLANE_HEADERS, (path, headers)
