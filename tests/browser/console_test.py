"""The operator console in a real browser: Debian's chromium driven by Playwright.

Run by tests/api/console_browser.rs against a live server it has seeded (two apps with
usage in SEEDED_MONTH, two open sessions of "recipes" and a busy one of "garden" (id in
BUSY_SESSION), uploads in the audit log). Reads CONSOLE_URL, ADMIN_BOOTSTRAP_TOKEN,
SEEDED_MONTH, BUSY_SESSION and SCREENSHOT_DIR from the environment;
exits non-zero on the first failed check. Prints one JSON line for the Rust side to check
the rows it left: {"minted_id": ..., "closed_session": ...}.
"""

import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

URL = os.environ["CONSOLE_URL"]
ADMIN = os.environ["ADMIN_BOOTSTRAP_TOKEN"]
MONTH = os.environ["SEEDED_MONTH"]
SHOTS = os.environ["SCREENSHOT_DIR"]
BUSY = os.environ["BUSY_SESSION"]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def call(method, path, bearer=None, cookie=None, body=None):
    """The API directly (not through the page): status and JSON body."""
    req = urllib.request.Request(URL + path, method=method)
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    if cookie:
        req.add_header("Cookie", cookie)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=30) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def token_record(token_id):
    status, v = call("GET", "/admin/tokens", bearer=ADMIN)
    check(status == 200, f"GET /admin/tokens: {status}")
    return next(t for t in v["tokens"] if t["id"] == token_id)


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def goto(page, heading):
    page.get_by_role("navigation", name="Console pages").get_by_role("link", name=heading).click()
    section = page.locator(f"#page-{heading.lower()}")
    expect(page.get_by_role("heading", level=1, name=heading)).to_be_visible()
    expect(section).to_have_attribute("data-ready", "true")


def redraw(page, view_id, action):
    """Does `action` and waits until the view `view_id` has been drawn again."""
    view = page.locator(f"#{view_id}")
    before = int(view.get_attribute("data-draws") or 0)
    action()
    expect(view).to_have_attribute("data-draws", str(before + 1))


def accessible_names_missing(page):
    """Visible controls without an accessible name (label, text or aria-label)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, a[href], textarea')]
            .filter((e) => e.offsetParent !== null)
            .filter((e) => {
                const aria = (e.getAttribute('aria-label') || '').trim();
                if (aria) return false;
                if (e.labels && e.labels.length) return false;
                return !(e.textContent || '').trim();
            })
            .map((e) => e.outerHTML.slice(0, 120))"""
    )


def fits_375(page):
    page.set_viewport_size({"width": 375, "height": 800})
    width = page.evaluate("() => document.documentElement.scrollWidth")
    page.set_viewport_size({"width": 1280, "height": 900})
    return width


def main():
    out = {}
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        browser.set_default_timeout(20_000)
        browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=URL)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # Nothing may be requested from another host.
        foreign = []
        page.on("request", lambda r: None if r.url.startswith(URL) else foreign.append(r.url))

        # ---- sign-in --------------------------------------------------------------
        page.goto(URL + "/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        check(not accessible_names_missing(page), f"unnamed controls: {accessible_names_missing(page)}")
        shot(page, "sign-in")
        page.get_by_label("Admin token").fill("not-the-admin-token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not the admin token")
        # Keyboard only: Tab to the field, type, Enter.
        for _ in range(10):
            if page.evaluate("() => document.activeElement && document.activeElement.id") == "admin-token":
                break
            page.keyboard.press("Tab")
        check(page.evaluate("() => document.activeElement.id") == "admin-token", "Tab never reached the token field")
        page.keyboard.type(ADMIN)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", level=1, name="Overview")).to_be_visible()

        cookie = next(c for c in browser.cookies() if c["name"] == "cf_console")
        check(cookie["httpOnly"], "cookie not HttpOnly")
        check(cookie["sameSite"] == "Strict", f"cookie SameSite {cookie['sameSite']}")
        check(not cookie["secure"], "Secure over plain HTTP")
        check("cf_console" not in page.evaluate("() => document.cookie"), "script can read the cookie")
        cookie_header = f"cf_console={cookie['value']}"

        # ---- Overview ------------------------------------------------------------
        expect(page.locator("#page-overview")).to_have_attribute("data-ready", "true")
        facts = page.locator("#overview-body dl")
        expect(facts).to_contain_text("2.1.197")  # claude
        expect(facts).to_contain_text("0.19.1")  # acpx
        expect(facts).to_contain_text("logged in")
        expect(facts).to_contain_text("Processes running")
        expect(page.get_by_role("table", name="The doctor's checks")).to_contain_text("login")
        shot(page, "overview")

        # ---- CSRF: the cookie alone cannot change anything -------------------------
        statuses = page.evaluate(
            """async () => {
                const body = JSON.stringify({name: 'csrf-probe'});
                const h = {'Content-Type': 'application/json'};
                const a = await fetch('/admin/tokens', {method: 'POST', headers: h, body});
                const b = await fetch('/admin/tokens', {method: 'POST', body,
                    headers: {...h, 'X-CSRF-Token': 'forged'}});
                return [a.status, b.status];
            }"""
        )
        check(statuses == [403, 403], f"state changes without the CSRF token: {statuses}")

        # ---- Apps: mint, plaintext once, policy edit, rotate, revoke -------------------
        goto(page, "Apps")
        form = page.locator("#mint-form")
        form.get_by_label("Name").fill("console-app")
        form.get_by_label("CIDRs").fill("127.0.0.1/32")
        form.get_by_label("Daily budget (USD)").fill("2")
        form.get_by_label("Monthly budget (USD)").fill("20")
        form.get_by_label("Max concurrent").fill("2")
        form.get_by_label("Rate per minute").fill("30")
        form.get_by_label("Allowed models").fill("sonnet, haiku")
        form.get_by_label("Default model").fill("haiku")
        form.get_by_role("button", name="Mint token").click()
        plaintext_el = page.locator("#minted-token")
        expect(plaintext_el).to_have_text(re.compile(r"^cf_[0-9A-Za-z]{32,}$"))
        plaintext = plaintext_el.inner_text()
        check(plaintext.startswith("cf_"), plaintext)
        page.get_by_role("button", name="Copy").click()
        expect(page.get_by_role("button", name="Copied")).to_be_visible()
        check(page.evaluate("() => navigator.clipboard.readText()") == plaintext, "clipboard")
        shot(page, "apps")
        status, v = call("GET", "/usage", bearer=plaintext)
        check(status == 200 and v["ok"], f"the minted token on the API: {status} {v}")
        minted = next(t for t in call("GET", "/admin/tokens", bearer=ADMIN)[1]["tokens"] if t["name"] == "console-app")
        out["minted_id"] = minted["id"]
        check(minted["budget_usd_per_day"] == 2 and minted["allowed_models"] == ["sonnet", "haiku"], f"{minted}")
        check(minted["default_model"] == "haiku" and minted["ip_cidrs"] == ["127.0.0.1/32"], f"{minted}")
        page.get_by_role("button", name="Done").click()
        expect(plaintext_el).to_be_hidden()
        page.reload()
        expect(page.locator("#page-apps")).to_have_attribute("data-ready", "true")
        check(plaintext not in page.content(), "the plaintext is shown again")
        check(plaintext not in json.dumps(call("GET", "/admin/tokens", bearer=ADMIN)[1]), "plaintext in the list")

        row = page.get_by_role("row").filter(has_text="console-app")
        row.get_by_role("button", name="Edit policy").click()
        edit = page.locator("#edit-form")
        edit.get_by_label("Daily budget (USD)").fill("3")
        edit.get_by_label("Rate per minute").fill("")
        edit.get_by_role("button", name="Save policy").click()
        expect(page.locator("#status")).to_contain_text("budget_usd_per_day, rate_per_min")
        t = token_record(minted["id"])
        check(t["budget_usd_per_day"] == 3, f"edited budget: {t}")
        check(t["rate_per_min"] is None, f"cleared rate: {t}")
        check(t["budget_usd_per_month"] == 20 and t["max_concurrent"] == 2, f"kept fields: {t}")
        check(t["allowed_models"] == ["sonnet", "haiku"], f"kept models: {t}")

        # Rotate: declining the confirmation changes nothing; accepting shows a new secret.
        page.once("dialog", lambda d: d.dismiss())
        row.get_by_role("button", name="Rotate").click()
        check(call("GET", "/usage", bearer=plaintext)[0] == 200, "a declined rotate rotated")
        page.once("dialog", lambda d: d.accept())
        row.get_by_role("button", name="Rotate").click()
        expect(plaintext_el).to_be_visible()
        rotated = plaintext_el.inner_text()
        check(rotated.startswith("cf_") and rotated != plaintext, "rotation shows a new plaintext")
        check(call("GET", "/usage", bearer=plaintext)[0] == 401, "the old secret still works")
        check(call("GET", "/usage", bearer=rotated)[0] == 200, "the new secret does not work")
        page.get_by_role("button", name="Done").click()

        page.once("dialog", lambda d: d.dismiss())
        row.get_by_role("button", name="Revoke").click()
        check(call("GET", "/usage", bearer=rotated)[0] == 200, "a declined revoke revoked")
        page.once("dialog", lambda d: d.accept())
        row.get_by_role("button", name="Revoke").click()
        expect(row).to_contain_text("revoked")
        check(call("GET", "/usage", bearer=rotated)[0] == 401, "a revoked token still works")

        # ---- Usage: the chart for the seeded month ----------------------------------
        goto(page, "Usage")
        page.get_by_label("Month", exact=True).fill(MONTH)
        page.get_by_role("button", name="Show").click()
        chart = page.get_by_role("img", name=f"Spend per day in {MONTH}, per app")
        expect(chart).to_be_visible()
        bars = page.locator("svg.chart rect.bar")
        expect(bars).to_have_count(4)
        titles = sorted(bars.nth(i).locator("title").text_content() for i in range(4))
        check(
            titles
            == sorted(
                [
                    f"recipes, {MONTH}-03: $1.50",
                    f"recipes, {MONTH}-07: $0.25",
                    f"garden, {MONTH}-07: $0.75",
                    f"recipes, {MONTH}-15: $2.00",
                ]
            ),
            f"bars: {titles}",
        )
        # Day 7 is one stack: garden's segment sits on top of recipes'.
        day7 = [bars.nth(i) for i in range(4) if bars.nth(i).get_attribute("data-day") == "7"]
        ys = sorted(float(b.get_attribute("y")) for b in day7)
        check(len(day7) == 2 and ys[0] < ys[1], f"day 7 stack: {ys}")
        models = page.get_by_role("table", name=f"Usage by model in {MONTH}")
        expect(models.get_by_role("row").filter(has_text="sonnet")).to_contain_text("$3.50")
        expect(models.get_by_role("row").filter(has_text="haiku")).to_contain_text("$1.00")
        budgets = page.get_by_role("table", name="Budgets remaining (UTC)")
        expect(budgets.get_by_role("row").filter(has_text="recipes")).to_contain_text("$50.00")
        shot(page, "usage")

        # ---- Sessions: every app's, close one ---------------------------------------
        goto(page, "Sessions")
        sessions = page.get_by_role("table", name="Sessions of every app")
        expect(sessions.get_by_role("row")).to_have_count(4)  # header + 3
        busy_row = sessions.get_by_role("row").filter(has_text=BUSY)
        expect(busy_row).to_contain_text("garden")
        expect(busy_row.locator(".badge")).to_have_text("busy")
        sf = page.locator("#sessions-form")
        sf.get_by_label("App", exact=True).select_option(label="garden")
        redraw(page, "sessions-body", lambda: sf.get_by_role("button", name="Show").click())
        expect(sessions.get_by_role("row")).to_have_count(2)
        sf.get_by_label("App", exact=True).select_option("")
        redraw(page, "sessions-body", lambda: sf.get_by_role("button", name="Show").click())
        expect(sessions.get_by_role("row")).to_have_count(4)
        first = sessions.get_by_role("row").filter(has_text="recipes").first
        session_id = first.locator("code").inner_text()
        page.once("dialog", lambda d: d.accept())
        first.get_by_role("button", name="Close").click()
        expect(page.locator("#status")).to_contain_text(f"Closed session {session_id}")
        closed_row = sessions.get_by_role("row").filter(has_text=session_id)
        expect(closed_row.locator(".badge")).to_have_text("closed")
        expect(closed_row.locator(".badge")).to_be_visible()
        check(closed_row.get_by_role("button", name="Close").count() == 0, "a closed session offers Close")
        out["closed_session"] = session_id
        shot(page, "sessions")

        # ---- Audit: filters and paging ----------------------------------------------
        goto(page, "Audit")
        af = page.locator("#audit-form")
        af.get_by_label("Kind", exact=True).select_option("upload")
        af.get_by_label("Outcome", exact=True).select_option("error")
        af.get_by_label("Rows per page", exact=True).select_option("10")
        redraw(page, "audit-body", lambda: page.get_by_role("button", name="Filter").click())
        audit = page.get_by_role("table", name="Audit log, newest first")
        expect(page.locator("#audit-page")).to_have_text("Page 1")
        expect(audit.locator("tbody tr")).to_have_count(10)

        def rows():
            return [
                [c.inner_text() for c in r.locator("td").all()]
                for r in audit.locator("tbody tr").all()
            ]

        page1 = rows()
        check(all(r[3] == "upload" and r[5] == "error" for r in page1), f"filtered rows: {page1}")
        ids1 = [int(r[0]) for r in page1]
        check(ids1 == sorted(ids1, reverse=True), f"newest first: {ids1}")
        redraw(page, "audit-body", lambda: page.get_by_role("button", name="Older").click())
        expect(page.locator("#audit-page")).to_have_text("Page 2")
        page2 = rows()
        ids2 = [int(r[0]) for r in page2]
        check(len(ids2) == 5 and max(ids2) < min(ids1), f"page 2: {ids2} after {ids1}")
        check(page.get_by_role("button", name="Older").is_disabled(), "a third page of 15 rows")
        redraw(page, "audit-body", lambda: page.get_by_role("button", name="Newer").click())
        expect(page.locator("#audit-page")).to_have_text("Page 1")
        check([int(r[0]) for r in rows()] == ids1, "Newer returns to page 1")
        af.get_by_label("Kind", exact=True).select_option("")
        af.get_by_label("Outcome", exact=True).select_option("")
        af.get_by_label("App", exact=True).select_option(label="garden")
        redraw(page, "audit-body", lambda: page.get_by_role("button", name="Filter").click())
        expect(page.locator("#audit-page")).to_have_text("Page 1")
        garden = rows()
        check(garden and all(r[2] == "garden" for r in garden), f"app filter: {garden}")
        af.get_by_label("App", exact=True).select_option("")
        redraw(page, "audit-body", lambda: page.get_by_role("button", name="Filter").click())
        expect(audit.locator("tbody tr")).to_have_count(10)
        shot(page, "audit")

        # ---- every page: accessible names, 375 px, keyboard navigation ---------------
        for heading in ["Overview", "Apps", "Usage", "Sessions", "Audit"]:
            goto(page, heading)
            missing = accessible_names_missing(page)
            check(not missing, f"{heading}: unnamed controls {missing}")
            width = fits_375(page)
            check(width <= 375, f"{heading} scrolls sideways at 375 px: {width}")
        page.set_viewport_size({"width": 375, "height": 800})
        goto(page, "Apps")
        shot(page, "apps-375px")
        page.set_viewport_size({"width": 1280, "height": 900})
        # The nav links are reachable and followable with the keyboard.
        page.get_by_role("link", name="Usage").focus()
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", level=1, name="Sessions")).to_be_visible()

        # ---- sign-out ------------------------------------------------------------------
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        check(call("GET", "/admin/tokens", cookie=cookie_header)[0] == 401, "the old cookie still works")
        page.reload()
        expect(page.get_by_label("Admin token")).to_be_visible()

        check(not errors, f"script errors: {errors}")
        check(not foreign, f"requests to other hosts: {foreign}")
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"console test failed: {e}", file=sys.stderr)
        raise
